"""Panoptic ground truth from Osprey region records (the generated dataset), for `osprey eval ovseg`.

The generated dataset's object masks never overlap, so each object is a thing segment and the pixels no object
covers are one `background` stuff segment. Written as COCO-panoptic (a json, id PNGs) plus the class list that
`--classes` reads, so the evaluation itself is the official one on any panoptic data.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from osprey.data.records import Record, read_records, record_masks

BACKGROUND = "background"


@dataclass(frozen=True)
class PanopticFiles:
    data: Path  # COCO-panoptic json (images, annotations with segments_info, categories)
    png_root: Path  # its id PNGs (id = R + 256 G + 256^2 B)
    classes: Path  # the class list (`--classes`): every category a thing, plus background as stuff


def is_panoptic_json(data: object) -> bool:
    return isinstance(data, dict) and "annotations" in data and "images" in data


def records_to_panoptic(records_path: str | Path, out_dir: str | Path, limit: int | None = None) -> PanopticFiles:
    """COCO-panoptic files from the first `limit` records of `records_path` (whose masks must not overlap)."""
    records = read_records(records_path)[:limit]
    names = sorted({r.category_name for rec in records for r in rec.annotation if r.category_name})
    cat_id = {name: k + 1 for k, name in enumerate(names)}
    out_dir = Path(out_dir)
    png_root = out_dir / "panoptic"
    png_root.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n, rec in enumerate(records):
        segments = _write_id_png(rec, cat_id, len(names) + 1, png_root / f"{n:06d}.png", f"{records_path}: record {n}")
        images.append({"id": n, "file_name": rec.file_name, "height": rec.height, "width": rec.width})
        annotations.append({"image_id": n, "file_name": f"{n:06d}.png", "segments_info": segments})
    classes = [{"id": cat_id[name], "name": name, "isthing": True, "synonyms": [name]} for name in names]
    classes.append({"id": len(names) + 1, "name": BACKGROUND, "isthing": False,
                    "synonyms": [BACKGROUND, "plain background"]})
    categories = [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])} for c in classes]
    files = PanopticFiles(out_dir / "panoptic.json", png_root, out_dir / "classes.json")
    _write_atomic(files.data, json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    _write_atomic(files.classes, json.dumps({"name": "synth", "classes": classes}, indent=1))
    return files


def _write_id_png(rec: Record, cat_id: dict[str, int], background_id: int, path: Path, where: str) -> list[dict]:
    """One record's id PNG; returns its segments_info."""
    masks = record_masks(rec)
    if masks.sum(axis=0).max(initial=0) > 1:
        raise ValueError(f"{where} has overlapping region masks; panoptic ground truth needs disjoint segments")
    ids = np.zeros((rec.height, rec.width), dtype=np.int64)
    segments = []
    for i, (region, mask) in enumerate(zip(rec.annotation, masks, strict=True)):
        if region.category_name and mask.any():
            ids[mask] = i + 1
            segments.append({"id": i + 1, "category_id": cat_id[region.category_name], "iscrowd": 0})
    if (ids == 0).any():
        ids[ids == 0] = 1000
        segments.append({"id": 1000, "category_id": background_id, "iscrowd": 0})
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return segments


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
