"""COCO-panoptic-style sets (COCO panoptic, Cityscapes / ADE20K in detectron2's panoptic layout) -> records
with one region per ground-truth segment, for the open-vocabulary segmentation eval (spec section 10).

Input: the panoptic json (`images`, `annotations: [{image_id, file_name, segments_info: [{id,
category_id, area, bbox, iscrowd}]}]`, `categories: [{id, name, isthing}]`) and the folder of PNG
segment-id maps (id = R + 256 * G + 256^2 * B; 0 = unlabelled). Masks are stored as compressed RLE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from data_tools.converters.common import (
    OPEN_VOCAB_QUESTION,
    ConvertStats,
    display_name,
    load_json,
    question_per_region,
)
from osprey.data.records import Record, parse_record
from osprey.masks import encode_rle, mask_to_bbox
from osprey.masks import panoptic_segment_ids as segment_ids


def convert_panoptic(panoptic_json: str, *, png_dir: str | None = None, include_crowd: bool = True,
                     max_regions: int | None = None, stats: ConvertStats | None = None,
                     progress: bool = True) -> Iterator[Record]:
    """One record per image, every segment a region (in `segments_info` order), each asked
    "What is in <regionK>? Using a short phrase." and answered with its category name.

    `png_dir` defaults to the json's path without `.json` (COCO: panoptic_val2017.json -> panoptic_val2017/).
    `max_regions` (None = all) keeps the first segments; the eval wants all of them.
    """
    stats = stats or ConvertStats()
    data = load_json(panoptic_json)
    png_root = Path(png_dir) if png_dir else Path(panoptic_json).with_suffix("")
    if not png_root.is_dir():
        raise FileNotFoundError(f"panoptic PNG folder {png_root} does not exist (pass --png-dir)")
    images = {img["id"]: img for img in data["images"]}
    categories = {c["id"]: c for c in data["categories"]}
    for ann in tqdm(data["annotations"], desc="convert panoptic", unit="img", disable=not progress):
        stats.images += 1
        image = images.get(ann["image_id"])
        if image is None:
            stats.skip("image missing from the panoptic json", f"image {ann['image_id']}")
            continue
        height, width = int(image["height"]), int(image["width"])
        png_path = png_root / ann["file_name"]
        if not png_path.is_file():
            stats.skip("segment PNG missing", str(png_path))
            continue
        ids = segment_ids(png_path)
        if ids.shape != (height, width):
            stats.skip("segment PNG size differs from the image", f"{png_path} {ids.shape} vs {(height, width)}")
            continue
        regions, answers = [], []
        for seg in ann["segments_info"]:
            what = f"segment {seg['id']} of image {ann['image_id']}"
            if seg.get("iscrowd", 0) and not include_crowd:
                stats.skip("iscrowd", what)
                continue
            category = categories.get(seg["category_id"])
            if category is None:
                stats.skip("unknown category_id", f"{what} (category_id {seg['category_id']})")
                continue
            mask = ids == seg["id"]
            if not mask.any():
                stats.skip("segment id absent from its PNG", what)
                continue
            regions.append({
                "segmentation": encode_rle(mask),
                "bbox": mask_to_bbox(mask),
                "category_id": seg["category_id"],
                "category_name": category["name"],
                "segment_id": seg["id"],
                "isthing": int(category.get("isthing", 0)),
                "iscrowd": int(seg.get("iscrowd", 0)),
                "area": int(mask.sum()),
            })
            answers.append(display_name(category["name"]))
            if max_regions is not None and 0 < max_regions == len(regions):
                break
        if not regions:
            stats.skip("no usable regions", f"image {ann['image_id']}")
            continue
        record = parse_record({
            "id": ann["image_id"],
            "file_name": image["file_name"],
            "height": height,
            "width": width,
            "annotation": regions,
            "conversations": question_per_region(OPEN_VOCAB_QUESTION, answers),
            "source": "panoptic",
        })
        stats.records += 1
        stats.regions += len(regions)
        yield record
