"""Generating a whole dataset: images + per-split, per-sub-set record files + a manifest, in parallel.

Determinism: image i is a pure function of `SeedSequence([seed, i])`, workers return serialised records,
and the parent writes them in index order, so the output bytes do not depend on the worker count.
Layout:

    DIR/images/000000.png ...
    DIR/{train,val,test}/{stage1_captions,stage2_categories,...}.json   (Osprey-724K record lists)
    DIR/manifest.json                                                   (sub-sets, counts, statistics)
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_tools.synth.records import SUBSETS, scene_records
from data_tools.synth.scene import sample_scene
from osprey.data.records import parse_record

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SynthConfig:
    out: str
    n: int
    seed: int = 0
    image_size: int = 256
    image_format: str = "png"  # "png" (lossless: colours exact) or "jpg" (smaller, faster)
    max_objects: int = 6
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # Images n .. n + extra_train - 1, all in train: a larger training set whose val and test images and records are
    # exactly those of the n-image dataset of the same seed (the split is drawn over the first n only), so models
    # trained on either are measured on the same held-out images.
    extra_train: int = 0

    @property
    def total(self) -> int:
        return self.n + self.extra_train

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):  # 0 and 0.0 must write the same manifest
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.n < 1 or self.extra_train < 0:
            raise ValueError(f"need n >= 1 and extra_train >= 0, got {self.n} and {self.extra_train}")
        if self.image_size < 64 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {self.image_size}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"bad split fractions val={self.val_fraction} test={self.test_fraction}")

    def manifest_config(self) -> dict[str, Any]:
        """The settings that decide the data (everything but the output folder), as the manifest records them
        (extra_train only where set, so the manifests of datasets without it are as they were)."""
        return {k: v for k, v in asdict(self).items() if k != "out" and not (k == "extra_train" and not v)}


def split_assignment(n: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Split name per image index: a seeded permutation, the first round(n*test) test, then val, rest train."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(n)
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    splits = ["train"] * n
    for rank, index in enumerate(order):
        splits[int(index)] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def _answer_lengths(record: dict[str, Any]) -> list[int]:
    """Word counts of the answers (gpt turns, or the text after "<regionK>: ")."""
    if "conversations" in record:
        return [len(t["value"].split()) for t in record["conversations"] if t["from"] == "gpt"]
    return [len(entry.split(":", 1)[1].split()) for entry in record["description"]]


def generate_image(index: int, config: SynthConfig) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Draw, save and annotate image `index`: (index, {sub-set: serialised record}, statistics)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, index]))
    scene = sample_scene(rng, config.image_size, config.max_objects)
    file_name = f"{index:06d}.{config.image_format}"
    path = Path(config.out) / "images" / file_name
    tmp = path.with_name(f".{file_name}.tmp")
    image = Image.fromarray(scene.image)
    if config.image_format == "png":
        image.save(tmp, format="PNG", compress_level=1)
    else:
        image.save(tmp, format="JPEG", quality=92)
    os.replace(tmp, path)
    records = scene_records(scene, index, f"images/{file_name}", rng)
    lines = {}
    for subset, record in records.items():
        parse_record(record)  # schema check in the worker, where it runs in parallel
        lines[subset] = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    stats = {
        "objects": len(scene.objects),
        "parts": sum(len(r["annotation"]) for s, r in records.items() if s == "stage3_parts"),
        "same_box_pairs": sum(1 for o in scene.objects if o.group == "same_box" and o.partner is not None
                              and o.bbox == scene.objects[o.partner].bbox) // 2,
        "answer_words": {s: _answer_lengths(r) for s, r in records.items()},
    }
    return index, lines, stats


class _ListWriter:
    """A JSON list written one pre-serialised record per line, to a temp file renamed into place on close
    (the same layout as osprey.data.records.RecordWriter, without re-validating in the parent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.file: TextIO = os.fdopen(fd, "w", encoding="utf-8")
        self.file.write("[")
        self.count = 0

    def write(self, line: str) -> None:
        self.file.write(("\n" if self.count == 0 else ",\n") + line)
        self.count += 1

    def close(self) -> None:
        self.file.write("\n]\n" if self.count else "]\n")
        self.file.close()
        os.chmod(self.tmp, 0o644)  # mkstemp makes the file private; the dataset is meant to be shared
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    return {"count": int(array.size), "mean": round(float(array.mean()), 2), "min": int(array.min()),
            "p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)), "max": int(array.max())}


def generate(config: SynthConfig, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Write the dataset described by `config` with `workers` processes; returns the manifest."""
    out = Path(config.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = split_assignment(config.n, config.seed, config.val_fraction, config.test_fraction)
    splits += ["train"] * config.extra_train
    writers = {(split, subset): _ListWriter(out / split / f"{subset}.json") for split in SPLITS for subset in SUBSETS}
    objects, parts, same_box = Counter(), Counter(), 0
    words: dict[str, list[int]] = {subset: [] for subset in SUBSETS}
    work = partial(generate_image, config=config)
    start = time.perf_counter()
    try:
        with ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(multiprocessing.Pool(workers))
                chunk = max(1, min(64, config.total // (8 * workers)))
                results = pool.imap(work, range(config.total), chunksize=chunk)  # ordered: independent of workers
            else:
                results = map(work, range(config.total))
            for index, lines, stats in tqdm(results, total=config.total, desc="synth", unit="img",
                                            disable=not progress):
                for subset, line in lines.items():
                    writers[(splits[index], subset)].write(line)
                objects[stats["objects"]] += 1
                parts[stats["parts"]] += 1
                same_box += stats["same_box_pairs"]
                for subset, lengths in stats["answer_words"].items():
                    words[subset].extend(lengths)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    elapsed = time.perf_counter() - start
    logger.info("generated %d images in %.1f s (%.1f images/s, %d workers)", config.total, elapsed,
                config.total / elapsed, workers)

    manifest = {
        "version": MANIFEST_VERSION,
        "generator": "osprey data synth",
        "config": config.manifest_config(),
        "images": {split: splits.count(split) for split in SPLITS},
        "subsets": {
            subset: {"stage": stage, "kind": kind,
                     "files": {split: f"{split}/{subset}.json" for split in SPLITS},
                     "records": {split: writers[(split, subset)].count for split in SPLITS}}
            for subset, (stage, kind) in SUBSETS.items()
        },
        "stats": {
            "objects_per_image": {str(k): objects[k] for k in sorted(objects)},
            "parts_per_image": {str(k): parts[k] for k in sorted(parts)},
            "same_box_pairs": same_box,
            "answer_words": {subset: _summary(lengths) for subset, lengths in words.items()},
        },
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    return manifest
