"""`osprey train clip`: pretrain a preset's vision tower as a CLIP model (open_clip) on a dataset's captions.

Osprey starts from a pretrained CLIP ConvNeXt whose convolutional features already tell objects apart; the mask
extractor only pools them. A model trained from scratch has no such tower, and the built-in model showed what
follows (docs/builtin_model.md): with uninformative region tokens at the start of stage 3 the LLM learns the
language prior, stops attending to the <mask>/<pos> slots, and the gradient to the extractor vanishes. This step
supplies the missing pretrained CLIP: the preset's open_clip vision tower plus a small open_clip text tower
(reading ids of the model's own tokenizer), trained with open_clip's contrastive `ClipLoss` on image captions,
plus the same loss between regions and their referring phrases (as RegionCLIP), so the features the mask
extractor pools learn to tell regions apart. A region's embedding reads the tower as the extractor does: every
level mask-pooled, through per-level linear maps, summed (`LevelRegionHead`; `region_levels="final"` instead puts
the last map's pooled features through the image path's head, where the category then settles out of the
extractor's linear reach: docs/builtin_model.md).

Referring phrases alone teach colour and position, not shape: in a batch of ~1000 regions the colour and the
place already single out a region's phrase (measured on one H100: 1,071 steps at batch 256 left a linear
category probe on the pooled features at 20.5 % against 11.9 % for the majority class). So regions are also
contrasted with their category names, as region-level pretraining on detection labels does (RegionCLIP, GLIP):
a softmax over the batch's *distinct* names (`distinct_text_loss`), since ClipLoss would count the other
regions of the same category as negatives.

The output is an open_clip weight file (`visual.*` and the text tower) that stage configs load through
`clip_weights:`, exactly as the official recipe loads the ConvNeXt-L CLIP file.

Several GPUs: launched by `torchrun`, each process takes `batch_size / world size` images of every step; the
image-caption loss contrasts the whole step's batch (features gathered with their gradients, as open_clip's own
distributed training), the region losses each process's regions (their counts differ per process), and gradients
are averaged over processes before clipping, so one step is the same step on any number of GPUs.

    osprey train clip --data data/synth --tokenizer runs/builtin/init --out runs/builtin/clip --steps 2000
    torchrun --nproc_per_node 4 $(which osprey) train clip --data data/synth ... --batch-size 1024
    osprey train --stage 1 --config builtin_stage1 --set clip_weights=runs/builtin/clip/open_clip.safetensors
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# The region heads live with the embeddings they define (osprey.embedding); imported here for the CLIP step.
from osprey.embedding import LevelRegionHead, region_embeddings_from_pooled

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "open_clip.safetensors"
REGION_LEVELS = ("all", "final")
LEVEL_HEAD = "region_level_head"  # the LevelRegionHead's module name in the CLIP: checkpointed, not exported


@dataclass(frozen=True)
class ClipPretrainConfig:
    data: str  # a generated dataset (`osprey data synth`): its stage-1 caption sub-sets are read
    tokenizer: str  # a model folder whose tokenizer encodes the captions (e.g. `osprey model init` output)
    out: str  # output folder: open_clip.safetensors, metrics.jsonl, checkpoints/ (while it runs)
    preset: str = "builtin"  # whose vision config (open_clip_config) is trained
    split: str = "train"
    steps: int = 2000
    batch_size: int = 256  # images per step over all processes (each of W processes takes batch_size / W)
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    region_weight: float = 1.0  # weight of the region-phrase loss (0: image-caption CLIP only)
    category_weight: float = 1.0  # weight of the region-category-name loss (0: none)
    # Which features a region embedding reads. "all": every level res2..res5, mask-pooled, each through its own
    # linear map, summed (the shape of the mask extractor, which reads them linearly); "final": the last map
    # mask-pooled through the trunk's head norm and the CLIP projection (the image path with another pooling).
    region_levels: str = "all"
    context_length: int = 64
    text_width: int = 256
    text_heads: int = 4
    text_layers: int = 4
    num_workers: int = 4
    seed: int = 0
    save_steps: int = 500
    log_steps: int = 10
    # Seconds of training (0: no limit): the cosine's horizon is fitted to the measured pace (train.schedule.TimeBox),
    # so the rate anneals to its end within the limit; the weights are written after it. For time-boxed machines.
    time_limit: float = 0.0
    # open_clip weights to start from (an earlier run's open_clip.safetensors), e.g. to carry on a run whose
    # checkpoint (with its optimizer state) is gone; the region level head is not exported and starts fresh.
    init: str | None = None
    device: str | None = None  # default: cuda when available
    progress: bool = True

    def __post_init__(self) -> None:
        if self.region_levels not in REGION_LEVELS:
            raise ValueError(f"region_levels must be one of {REGION_LEVELS}, got {self.region_levels!r}")
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.context_length < 4 or self.time_limit < 0:
            raise ValueError(f"need steps >= 1, batch_size >= 2 (contrastive), lr > 0, context_length >= 4, "
                             f"time_limit >= 0; got {self.steps}, {self.batch_size}, {self.lr}, {self.context_length}, "
                             f"{self.time_limit}")


class ClipPairsDataset(Dataset):
    """Per image: (preprocessed image, caption ids, region masks (Q, H, W), phrase ids (Q, L)).

    Captions come from the caption records (every assistant turn is a pair), regions and phrases from the
    referring records (`<regionK>: phrase` descriptions, read by `osprey.data.samples.region_descriptions`, so
    phrase i goes with the mask of region K) of the same image; an image without referring records has Q = 0.
    Category names come from the category records of the same image whose regions are the referring record's
    (same annotation); `categories` holds one name per region (all pad ids where a region has none).
    """

    def __init__(self, caption_specs, referring_specs, tokenizer, vision_config, context_length: int,
                 category_specs=()) -> None:
        from osprey.data.records import iter_records
        from osprey.data.samples import region_descriptions

        self.vision_config = vision_config
        self.context_length = context_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token; the text tower pools at it")
        self.tokenizer = tokenizer
        regions: dict[Path, tuple[Any, list[tuple[int, str]]]] = {}
        for spec in referring_specs:
            for _, record in iter_records(spec.path):
                described = region_descriptions(record)
                if described:
                    regions[spec.image_root / record.file_name] = (record, described)
        names: dict[Path, dict[int, str]] = {}
        for spec in category_specs:
            for _, record in iter_records(spec.path):
                path = spec.image_root / record.file_name
                if path in regions and regions[path][0].annotation == record.annotation:
                    names[path] = dict(region_descriptions(record))
        self.items: list[tuple[Path, str, Any, list[tuple[int, str, str | None]]]] = []
        for spec in caption_specs:
            for _, record in iter_records(spec.path):
                path = spec.image_root / record.file_name
                region_record, phrases = regions.get(path, (None, []))
                labelled = [(k, text, names.get(path, {}).get(k)) for k, text in phrases]
                for turn in record.conversations or ():
                    if turn.speaker == "gpt":
                        self.items.append((path, turn.value, region_record, labelled))
        if not self.items:
            raise ValueError(f"no captions found in {[str(s.path) for s in caption_specs]}")

    def __len__(self) -> int:
        return len(self.items)

    def encode(self, text: str) -> torch.Tensor:
        """Text -> (context_length,) ids ending in eos (truncated before it if long), padded with pad_id."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.context_length - 1] + [self.eos_id]
        out = torch.full((self.context_length,), self.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        from osprey.data.records import record_masks
        from osprey.preprocess import load_image, preprocess_image

        path, caption, region_record, described = self.items[index]
        image = load_image(path)
        if region_record is not None:
            masks = torch.from_numpy(record_masks(region_record)).to(torch.bool)[[k - 1 for k, _, _ in described]]
            phrase_ids = torch.stack([self.encode(text) for _, text, _ in described])
            no_name = torch.full((self.context_length,), self.pad_id, dtype=torch.long)
            category_ids = torch.stack([no_name if name is None else self.encode(name) for _, _, name in described])
        else:
            masks = torch.zeros((0, image.height, image.width), dtype=torch.bool)
            phrase_ids = category_ids = torch.zeros((0, self.context_length), dtype=torch.long)
        return {"image": preprocess_image(image, self.vision_config), "caption": self.encode(caption),
                "masks": masks, "phrases": phrase_ids, "categories": category_ids}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    from osprey.data.dataset import PackedMasks

    return {"images": torch.stack([i["image"] for i in items]), "captions": torch.stack([i["caption"] for i in items]),
            "masks": PackedMasks.pack([i["masks"] for i in items]), "phrases": torch.cat([i["phrases"] for i in items]),
            "categories": torch.cat([i["categories"] for i in items])}


def distinct_text_loss(region_features: torch.Tensor, text_ids: torch.Tensor, encode_text, logit_scale: torch.Tensor,
                       pad_id: int) -> torch.Tensor | None:
    """Cross-entropy of each region over the batch's distinct texts (its own text the target; UniCL-style).

    Rows of `text_ids` that are all `pad_id` (no text) are left out; None when fewer than two distinct texts
    remain (nothing to contrast).
    """
    has_text = (text_ids != pad_id).any(dim=1)
    if not bool(has_text.any()):
        return None
    distinct, target = torch.unique(text_ids[has_text], dim=0, return_inverse=True)
    if len(distinct) < 2:
        return None
    text_features = encode_text(distinct, normalize=True)
    logits = logit_scale * region_features[has_text] @ text_features.T
    return F.cross_entropy(logits.float(), target)


def image_and_region_embeddings(visual, images: torch.Tensor, masks,
                                level_head: LevelRegionHead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip TimmModel -> (B, E) image embeddings (its own global pooling) and (sum Q, E) region embeddings:
    with `level_head`, every level mask-pooled (`osprey.mask_extractor.masked_mean_pool_batch`) through it;
    without, the trunk's final map mask-pooled through the image path's head."""
    from osprey.mask_extractor import masked_mean_pool_batch
    from osprey.vision import trunk_levels

    trunk = visual.trunk
    levels = trunk_levels(trunk, images)
    features = trunk.norm_pre(levels[-1])  # the rest of timm's forward_features
    image_embeddings = visual.head(trunk.forward_head(features))
    if level_head is not None:
        pooled = [masked_mean_pool_batch(level, list(masks)).to(level.dtype) for level in levels]
        return image_embeddings, level_head(pooled)
    pooled = masked_mean_pool_batch(features, list(masks)).to(features.dtype)
    return image_embeddings, region_embeddings_from_pooled(visual, pooled)


def build_clip(vision_config, vocab_size: int, pad_id: int, eos_id: int, cfg: ClipPretrainConfig):
    """An open_clip CLIP: the preset's vision tower config and a small text tower over `vocab_size` ids."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from osprey.vision import open_clip_model_config

    clip_cfg = open_clip_model_config(vision_config)
    text_cfg = CLIPTextCfg(context_length=cfg.context_length, vocab_size=vocab_size, width=cfg.text_width,
                           heads=cfg.text_heads, layers=cfg.text_layers, pad_id=pad_id, eos_id=eos_id,
                           pool_type="eos")
    return CLIP(embed_dim=clip_cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**clip_cfg["vision_cfg"]), text_cfg=text_cfg)


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Load an exported open_clip weight file into `model`; only the (unexported) region level head may be missing."""
    from safetensors.torch import load_file

    hint = f"{path} does not fit this CLIP (same preset and text tower sizes?)"
    try:
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    except RuntimeError as error:  # shapes differ
        lines = str(error).splitlines()  # "Error(s) in loading state_dict for CLIP:", then one line per tensor
        raise ValueError(f"{hint}: {(lines[1:] or lines)[0].strip()}") from error
    missing = [k for k in missing if not k.startswith(f"{LEVEL_HEAD}.")]
    if missing or unexpected:
        raise ValueError(f"{hint}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}")
    logger.info("started from the weights of %s", path)


def in_batch_accuracy(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Share of images whose own caption is the most similar one in the batch (and vice versa), averaged."""
    logits = image_features @ text_features.T
    target = torch.arange(len(logits), device=logits.device)
    return float(((logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()) / 2)


def clip_training_entry(weights: str | Path) -> dict[str, Any] | None:
    """The `training_data` entry (stage 0) of a weight file this command wrote, from the `clip_config.json` beside
    it; None for other files (an official CLIP), whose training data is not ours to know."""
    from osprey.data.provenance import training_entry

    config = Path(weights).with_name("clip_config.json")
    try:
        recorded = json.loads(config.read_text())
        return training_entry(recorded["data"], recorded.get("split", "train"), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_from_args(args: Any) -> ClipPretrainConfig:
    fields = ClipPretrainConfig.__dataclass_fields__
    return ClipPretrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
