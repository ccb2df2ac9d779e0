"""Visual Genome region captions -> short-description records (boxes become rectangle polygons).

Input: `region_descriptions.json` (a list of {"id": image_id, "regions": [{"region_id", "image_id", "x",
"y", "width", "height", "phrase"}]}; ~700 MB, so it is streamed) and `image_data.json` (sizes and `url`;
`image_id` in v1.4, `id` in v1.2). File names are the URL's last two parts ("VG_100K/1.jpg").
Boxes reaching outside the image (VG has some) are clipped to it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Literal

from tqdm import tqdm

from data_tools.converters.common import (
    SHORT_CAPTION_QUESTION,
    ConvertStats,
    checked_region,
    file_name_from_url,
    load_json,
    question_per_region,
    shuffled_capped,
)
from osprey.data.records import Record, iter_json_items, parse_record
from osprey.masks import box_to_polygon


def convert_vg(region_descriptions: str, image_data: str, *, style: Literal["conversation", "description"] =
               "conversation", seed: int = 0, max_regions: int | None = 15, stats: ConvertStats | None = None,
               progress: bool = True) -> Iterator[Record]:
    """One record per image: `conversation` asks "Please give me a short description of <regionK>." per
    region; `description` writes "<regionK>: phrase" entries."""
    if style not in ("conversation", "description"):
        raise ValueError(f"style must be 'conversation' or 'description', got {style!r}")
    stats = stats or ConvertStats()
    images = {img.get("image_id", img.get("id")): img for img in load_json(image_data)}
    for _, entry in tqdm(iter_json_items(region_descriptions), desc="convert vg", unit="img", disable=not progress):
        stats.images += 1
        image_id = entry.get("id", entry.get("image_id"))
        image = images.get(image_id)
        if image is None:
            stats.skip("image missing from image_data.json", f"image {image_id}")
            continue
        height, width = int(image["height"]), int(image["width"])
        usable = []
        for region in entry.get("regions", []):
            what = f"region {region.get('region_id')} of image {image_id}"
            phrase = " ".join(str(region.get("phrase", "")).split())
            if not phrase:
                stats.skip("empty phrase", what)
                continue
            polygon = _clipped_box_polygon(region, height, width)
            if polygon is None:
                stats.skip("box empty after clipping to the image", what)
                continue
            if checked_region([polygon], height, width, what, stats) is None:
                continue
            box = [polygon[0], polygon[1], polygon[2] - polygon[0], polygon[5] - polygon[1]]
            usable.append(({"segmentation": [polygon], "bbox": box, "region_id": region.get("region_id")}, phrase))
        if not usable:
            stats.skip("no usable regions", f"image {image_id}")
            continue
        chosen = shuffled_capped(usable, max_regions, random.Random(f"{seed}:{image_id}"))
        phrases = [p for _, p in chosen]
        texts = ({"conversations": question_per_region(SHORT_CAPTION_QUESTION, phrases)} if style == "conversation"
                 else {"description": [f"<region{k}>: {p}" for k, p in enumerate(phrases, start=1)]})
        record = parse_record({
            "id": image_id,
            "file_name": file_name_from_url(image["url"]) if image.get("url") else f"{image_id}.jpg",
            "height": height,
            "width": width,
            "annotation": [r for r, _ in chosen],
            **texts,
            "source": "vg",
        })
        stats.records += 1
        stats.regions += len(chosen)
        yield record


def _clipped_box_polygon(region: dict, height: int, width: int) -> list[float] | None:
    """VG box (x, y, width, height) clipped to the image, as a rectangle polygon; None if nothing is left."""
    try:
        x, y, w, h = (float(region[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if not (x1 > x0 and y1 > y0):
        return None
    return box_to_polygon([x0, y0, x1 - x0, y1 - y0])
