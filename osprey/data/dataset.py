"""A torch Dataset over record files (samples -> token ids, image tensor, region masks) and its collator.

Records are read once, as plain dicts, and turned into samples on access: the stage-2 shuffle and question
choice are seeded by (seed, epoch, index), so an epoch is reproducible and different epochs differ. Only
`__getitem__` opens the image and decodes masks; `example()` (tokens only) and `lengths()` (an estimate for a
length-grouped sampler) never do.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from osprey.config import VisionConfig
from osprey.data.records import iter_json_items
from osprey.data.samples import DEFAULT_REGION_CAP, STAGE_KINDS, Sample, build_sample
from osprey.preprocess import load_image, masks_to_tensor, preprocess_image
from osprey.prompts import IMAGE_PLACEHOLDER, REGION_PLACEHOLDER, TEMPLATES
from osprey.tokenization import IGNORE_INDEX, Example, build_example

__all__ = ["RegionCollator", "RegionDataset", "SubsetSpec", "count_fully_masked", "manifest_subsets"]

logger = logging.getLogger(__name__)

# Batch keys that are `OspreyForCausalLM.forward` arguments; a batch also carries `truncated: (B,) bool`.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "masks")


@dataclass(frozen=True)
class SubsetSpec:
    """One record file and how to read it: its stage, its kind (see samples.STAGE_KINDS), its image folder."""

    path: Path
    stage: int
    kind: str
    image_root: Path

    def __post_init__(self) -> None:
        if self.stage not in STAGE_KINDS or self.kind not in STAGE_KINDS[self.stage]:
            raise ValueError(f"{self.path}: unknown stage/kind {self.stage}/{self.kind!r}; known: {STAGE_KINDS}")


def manifest_subsets(root: str | Path, split: str = "train", stages: Iterable[int] | None = None,
                     names: Iterable[str] | None = None) -> list[SubsetSpec]:
    """The sub-sets of a generated dataset (`root/manifest.json`, see `osprey data synth`) for one split,
    optionally only some stages or sub-set names; images are resolved against `root`."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    wanted_stages = None if stages is None else set(stages)
    wanted_names = None if names is None else set(names)
    if wanted_names is not None and not wanted_names <= set(manifest["subsets"]):
        raise ValueError(f"unknown sub-sets {sorted(wanted_names - set(manifest['subsets']))}; "
                         f"{root}/manifest.json has {sorted(manifest['subsets'])}")
    specs = []
    for name, info in manifest["subsets"].items():
        if wanted_stages is not None and info["stage"] not in wanted_stages:
            continue
        if wanted_names is not None and name not in wanted_names:
            continue
        if split not in info["files"]:
            raise ValueError(f"sub-set {name} has no split {split!r}; splits: {sorted(info['files'])}")
        specs.append(SubsetSpec(root / info["files"][split], info["stage"], info["kind"], root))
    return specs


def specs_for_files(files: Iterable[str | Path], root: str | Path, image_root: str | Path | None = None, *,
                    stage: int | None = None, kind: str | None = None) -> list[SubsetSpec]:
    """Specs for record files given by path (relative to `root`): stage and kind are `stage`/`kind` when given
    (they apply to every file; a file may be read as another kind, e.g. categories as task samples), else
    what `root/manifest.json` lists for the file (a generated dataset)."""
    root = Path(root)
    images = Path(image_root) if image_root is not None else root
    listed: dict[Path, tuple[int, str]] = {}
    if (root / "manifest.json").is_file():
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        for info in manifest["subsets"].values():
            for rel in info["files"].values():
                listed[(root / rel).resolve()] = (info["stage"], info["kind"])
    specs = []
    for file in files:
        path = Path(file) if Path(file).is_absolute() else root / file
        if stage is not None and kind is not None:
            specs.append(SubsetSpec(path, stage, kind, images))
        elif path.resolve() in listed:
            specs.append(SubsetSpec(path, *listed[path.resolve()], images))
        else:
            raise ValueError(f"{path}: not listed in {root / 'manifest.json'}; give its stage and kind "
                             f"(one of {STAGE_KINDS})")
    return specs


class RegionDataset(Dataset):
    """Training examples from one or more record files.

    Item: `input_ids (T,) long`, `labels (T,) long`, `pixel_values (3, S, S) float`, `masks (Q, H, W) bool`
    (Q = regions kept after truncation, H x W = the image's own size), `truncated`, `fully_masked`, `index`.
    Stage-3 records with more than `max_regions` regions are skipped, as the official loaders do.
    """

    def __init__(self, subsets: Sequence[SubsetSpec], tokenizer, vision: VisionConfig, *, max_length: int | None = 2048,
                 template: str = "train", seed: int = 0, image_token_id: int = -200,
                 max_regions: int = DEFAULT_REGION_CAP) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
        self.subsets = list(subsets)
        self.tokenizer = tokenizer
        self.vision = vision
        self.max_length = max_length
        self.template = template
        self.seed = seed
        self.epoch = 0
        self.image_token_id = image_token_id
        self.num_image_tokens = vision.num_image_tokens
        # Records are kept as JSON bytes in one array (+ start/end offsets), not as Python dicts: far less memory,
        # and DataLoader workers forked from this process do not copy it page by page through reference counting.
        # A file listed again (a sub-set repeated in a mix, or read as another kind) is read once: its items point
        # at the same bytes.
        blob = bytearray()
        starts: list[int] = []
        ends: list[int] = []
        subset_of: list[int] = []
        read: dict[tuple[Path, bool], tuple[list[int], list[int]]] = {}
        skipped = 0
        for subset_index, spec in enumerate(self.subsets):
            key = (Path(spec.path).resolve(), spec.stage == 3)
            if key not in read:
                file_starts, file_ends = [], []
                for _, obj in iter_json_items(spec.path):
                    if spec.stage == 3 and len(obj.get("annotation", ())) > max_regions:
                        skipped += 1
                        continue
                    file_starts.append(len(blob))
                    blob += json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                    file_ends.append(len(blob))
                read[key] = (file_starts, file_ends)
            starts += read[key][0]
            ends += read[key][1]
            subset_of += [subset_index] * len(read[key][0])
        self._blob = np.frombuffer(blob, dtype=np.uint8)
        self._starts = np.asarray(starts, dtype=np.int64)
        self._ends = np.asarray(ends, dtype=np.int64)
        self._subset_of = np.asarray(subset_of, dtype=np.int32)
        if skipped:
            logger.info("skipped %d stage-3 records with more than %d regions", skipped, max_regions)
        self._warned = 0
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self._subset_of)

    def subset(self, index: int) -> SubsetSpec:
        """The spec of the file item `index` comes from."""
        return self.subsets[int(self._subset_of[index])]

    def record(self, index: int) -> dict[str, Any]:
        """The raw record (JSON object) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return json.loads(self._blob[self._starts[index]:self._ends[index]].tobytes())

    def set_epoch(self, epoch: int) -> None:
        """Reseed the per-sample randomness (stage-2 region order, question choice) for a new epoch."""
        self.epoch = epoch

    def describe(self, index: int) -> str:
        """'file#record-id' of an item, for messages."""
        return f"{self.subset(index).path}#{self.record(index).get('id')}"

    def sample(self, index: int) -> Sample:
        """The (untokenized) sample of item `index` in the current epoch."""
        spec = self.subset(index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        return build_sample(self.record(index), spec.stage, spec.kind, spec.image_root, rng)

    def example(self, index: int, sample: Sample | None = None) -> Example:
        """The tokenized example of item `index` (no image is read)."""
        sample = self.sample(index) if sample is None else sample
        return build_example(self.tokenizer, sample.messages, num_image_tokens=self.num_image_tokens,
                             image_token_id=self.image_token_id, template=self.template, max_length=self.max_length)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.sample(index)
        example = self.example(index, sample)
        if example.fully_masked and self._warned < 10:
            self._warned += 1
            logger.warning("item %d (%s) has no trained token (truncated=%s): it adds no loss", index,
                           self.describe(index), example.truncated)
        image = load_image(sample.image_path)
        if (image.height, image.width) != (sample.height, sample.width):
            raise ValueError(f"{sample.image_path} is {image.width}x{image.height} but its record says "
                             f"{sample.width}x{sample.height} ({self.describe(index)})")
        masks = sample.masks()[: example.num_regions]  # truncation may drop trailing regions
        return {
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),
            "labels": torch.tensor(example.labels, dtype=torch.long),
            "pixel_values": preprocess_image(image, self.vision),
            "masks": masks_to_tensor(masks, sample.height, sample.width),
            "truncated": example.truncated,
            "fully_masked": example.fully_masked,
            "index": index,
        }

    @property
    def lengths(self) -> list[int]:
        """Estimated token count per item (see `estimate_lengths`), computed once, for length-grouped batching."""
        if self._lengths is None:
            self._lengths = self.estimate_lengths()
        return self._lengths

    def estimate_lengths(self, chars_per_token: float = 4.0, workers: int = 0) -> list[int]:
        """Image slots + 2 per region + text characters / chars_per_token, per item (capped at max_length);
        reads neither images nor masks and does not tokenize (~0.15 ms per item: JSON + schema + builder).

        `workers` > 0 spreads the items over that many DataLoader worker processes, as training reads them: a mix
        of 315,000 samples (the built-in model's last stage-3 pass) takes ~35 s in one process on a GPU machine,
        time its device calls did not train in. The result is the same either way.
        """
        if workers > 0 and len(self) > _LENGTH_CHUNK:
            from torch.utils.data import DataLoader

            chunks = _LengthChunks(self, chars_per_token)
            loader = DataLoader(chunks, batch_size=None, num_workers=min(workers, len(chunks)))
            return [n for chunk in loader for n in chunk]
        overhead = self._template_overhead()
        return [self._estimate_length(index, chars_per_token, overhead) for index in range(len(self))]

    def _template_overhead(self) -> int:
        return len(TEMPLATES[self.template].render([("human", ""), ("gpt", "")]))

    def _estimate_length(self, index: int, chars_per_token: float, overhead: int) -> int:
        sample = self.sample(index)
        text_chars = sum(len(t) for _, t in sample.messages) + overhead * (len(sample.messages) // 2)
        regions = sample.num_mask_tokens
        images = sum(t.count(IMAGE_PLACEHOLDER) for _, t in sample.messages)
        text_chars -= regions * len(REGION_PLACEHOLDER) + images * len(IMAGE_PLACEHOLDER)
        estimate = images * self.num_image_tokens + 2 * regions + math.ceil(text_chars / chars_per_token)
        return estimate if self.max_length is None else min(estimate, self.max_length)


_LENGTH_CHUNK = 4096  # items per worker task when the length estimate runs in parallel


class _LengthChunks(Dataset):
    """Chunk k: the length estimates of items [k * _LENGTH_CHUNK, (k + 1) * _LENGTH_CHUNK) of a RegionDataset."""

    def __init__(self, dataset: RegionDataset, chars_per_token: float) -> None:
        self.dataset, self.chars_per_token = dataset, chars_per_token

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / _LENGTH_CHUNK)

    def __getitem__(self, chunk: int) -> list[int]:
        start = chunk * _LENGTH_CHUNK
        overhead = self.dataset._template_overhead()
        return [self.dataset._estimate_length(index, self.chars_per_token, overhead)
                for index in range(start, min(start + _LENGTH_CHUNK, len(self.dataset)))]


class PackedMasks(Sequence[torch.Tensor]):
    """A batch's per-image `(Q_i, H_i, W_i)` bool mask stacks in one flat buffer, read as a sequence of views.

    Why: a DataLoader worker hands each tensor of a batch to the main process through its own shared-memory file
    descriptor, and the main process receives descriptors one by one; a list of one mask tensor per image made
    that the bottleneck of region training (one H200, stage 3, batch 256: ~150 samples/s with the GPU mostly
    idle). Packed, a batch's masks cross as one tensor, are pinned as one block and reach the GPU in one copy.
    """

    def __init__(self, buffer: torch.Tensor, shapes: Sequence[tuple[int, int, int]]) -> None:
        self.buffer = buffer
        self.shapes = [tuple(int(v) for v in shape) for shape in shapes]
        sizes = [q * h * w for q, h, w in self.shapes]
        if buffer.dim() != 1 or buffer.numel() != sum(sizes):
            raise ValueError(f"mask buffer of shape {tuple(buffer.shape)} does not hold stacks of shapes {self.shapes}")
        self._offsets = [0]
        for size in sizes:
            self._offsets.append(self._offsets[-1] + size)

    @classmethod
    def pack(cls, stacks: Sequence[torch.Tensor]) -> PackedMasks:
        for stack in stacks:
            if stack.dim() != 3:
                raise ValueError(f"mask stacks must be (Q, H, W), got shape {tuple(stack.shape)}")
        flat = [stack.reshape(-1).to(torch.bool) for stack in stacks]
        buffer = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.bool)
        return cls(buffer, [tuple(stack.shape) for stack in stacks])

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:  # a slice gives a list
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self.buffer[start:stop].view(self.shapes[index])

    def pin_memory(self) -> PackedMasks:  # called by DataLoader(pin_memory=True)
        return PackedMasks(self.buffer.pin_memory(), self.shapes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedMasks:
        return PackedMasks(self.buffer.to(device, non_blocking=non_blocking), self.shapes)


class RegionCollator:
    """Batches items: `input_ids (B, T)` right-padded with `pad_token_id`, `attention_mask (B, T)`, `labels (B, T)`
    padded with -100, `pixel_values (B, 3, S, S)`, `masks` the per-image `(Q_i, H_i, W_i)` bool stacks as one
    `PackedMasks` (a sequence of tensors; these are MODEL_INPUT_KEYS), and `truncated (B,) bool` for bookkeeping."""

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative id, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        longest = max(item["input_ids"].numel() for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = item["input_ids"].numel()
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "masks": PackedMasks.pack([item["masks"] for item in items]),
            "truncated": torch.tensor([bool(item["truncated"]) for item in items]),
        }


def count_fully_masked(dataset: RegionDataset, indices: Iterable[int] | None = None) -> list[int]:
    """Indices of items whose loss would be fully masked (no trained token: every answer truncated away, or
    an empty answer). Tokenizes only; logs one warning with the count and the first offenders."""
    bad = []
    truncated = examined = 0
    for index in range(len(dataset)) if indices is None else indices:
        examined += 1
        example = dataset.example(index)
        truncated += example.truncated
        if example.fully_masked:
            bad.append(index)
    if bad:
        shown = ", ".join(dataset.describe(i) for i in bad[:5])
        logger.warning("%d of %d items would train no token (fully masked; %d truncated in all), e.g. %s",
                       len(bad), examined, truncated, shown)
    return bad
