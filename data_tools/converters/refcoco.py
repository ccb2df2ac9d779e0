"""RefCOCO / RefCOCO+ / RefCOCOg (refer toolkit layout) -> stage-2 referring records.

Input: `refs(unc).p` / `refs(google).p` / `refs(umd).p` (a pickled list of refs: `ref_id`, `ann_id`,
`image_id`, `split`, `sentences: [{sent, raw, tokens, sent_id}]`, `category_id`) and the dataset's
`instances.json` (COCO images + annotations). One record per image of the chosen split: one region per
ref (its annotation's mask), answered by one of its referring expressions (seeded choice).
The refs file is a pickle: load only files from the dataset you downloaded (pickles can run code).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data_tools.converters.common import (
    REFERRING_INSTRUCTION,
    ConvertStats,
    checked_region,
    group_by,
    load_json,
    one_turn_per_region,
    shuffled_capped,
)
from osprey.data.records import Record, parse_record


def load_refs(path: str | Path) -> list[dict]:
    """The refer toolkit's refs pickle (Python 2 pickles decode their byte strings as latin-1)."""
    with open(path, "rb") as f:
        refs = pickle.load(f, encoding="latin1")
    if not isinstance(refs, list):
        raise TypeError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    return refs


def convert_refcoco(refs_path: str, instances: str, *, split: str = "train", seed: int = 0,
                    max_regions: int | None = 15, source: str | None = None,
                    stats: ConvertStats | None = None, progress: bool = True) -> Iterator[Record]:
    """refs pickle + instances.json -> one record per image of `split` (train/val/test/testA/testB).

    `source` defaults to the refs file's folder name (refcoco, refcoco+, refcocog).
    """
    stats = stats or ConvertStats()
    source = source or Path(refs_path).resolve().parent.name.lower() or "refcoco"
    refs = load_refs(refs_path)
    splits = sorted({str(r.get("split")) for r in refs})
    if split not in splits:
        raise ValueError(f"split {split!r} not in {refs_path} (splits there: {splits})")
    data = load_json(instances)
    images = {img["id"]: img for img in data["images"]}
    anns = {ann["id"]: ann for ann in data["annotations"]}
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    refs_by_image = group_by((r for r in refs if r.get("split") == split), "image_id")
    for image_id in tqdm(sorted(refs_by_image), desc=f"convert {source} {split}", unit="img", disable=not progress):
        stats.images += 1
        image = images.get(image_id)
        if image is None:
            stats.skip("image missing from instances.json", f"image {image_id}")
            continue
        height, width = int(image["height"]), int(image["width"])
        rng = random.Random(f"{seed}:{image_id}")
        usable = []
        for ref in refs_by_image[image_id]:
            what = f"ref {ref.get('ref_id')} (ann {ref.get('ann_id')}) of image {image_id}"
            ann = anns.get(ref["ann_id"])
            if ann is None:
                stats.skip("annotation missing from instances.json", what)
                continue
            sentences = [s["sent"].strip() for s in ref.get("sentences", []) if str(s.get("sent", "")).strip()]
            if not sentences:
                stats.skip("no referring expression", what)
                continue
            if checked_region(ann["segmentation"], height, width, what, stats) is None:
                continue
            usable.append((ref, ann, rng.choice(sentences)))
        if not usable:
            stats.skip("no usable regions", f"image {image_id}")
            continue
        chosen = shuffled_capped(usable, max_regions, rng)
        regions = [
            {
                "segmentation": ann["segmentation"],
                "bbox": ann["bbox"],
                "category_id": ann.get("category_id"),
                **({"category_name": categories[ann["category_id"]]} if ann.get("category_id") in categories else {}),
                "ann_id": ann["id"],
                "ref_id": ref.get("ref_id"),
            }
            for ref, ann, _ in chosen
        ]
        record = parse_record({
            "id": image_id,
            "file_name": image["file_name"],
            "height": height,
            "width": width,
            "annotation": regions,
            "conversations": one_turn_per_region(REFERRING_INSTRUCTION, [sent for _, _, sent in chosen]),
            "source": source,
            "split": split,
        })
        stats.records += 1
        stats.regions += len(regions)
        yield record
