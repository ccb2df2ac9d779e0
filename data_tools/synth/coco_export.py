"""A generated dataset's split as a COCO instances file with per-region attributes (`osprey data synth-coco`).

The fine-tuning guide (docs/finetune.md) starts from a user's COCO JSON with an `attributes` field per
annotation; this writes one from `osprey data synth` output, so the guide's path can be tested and the built-in
model fine-tuned through it (bench/finetune_builtin.sh). Every object region of `stage2_categories` becomes an
annotation (id = image id * 100 + region number) whose `attributes` are read from the same region's referring
expression in `stage2_referring` ("small red striped triangle in the top left of the image"): `color`, `size`,
`position` and, for simple shapes, `texture`. The words come from the generator's own tables, so the parse is exact.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from data_tools.synth.vocab import COLORS, COMPOSITES, POSITIONS, SHAPES, SIZE_CLASSES, TEXTURES
from osprey.data.records import iter_records
from osprey.data.samples import region_descriptions

ANNOTATION_ID_STRIDE = 100  # annotation id = image id * stride + region number (an image has at most 6 objects)

_ALTERNATIVES = {
    "size": [name for name, _ in SIZE_CLASSES],
    "color": list(COLORS),
    "texture": [t for t in TEXTURES if t != "solid"],
    "category": list(SHAPES) + list(COMPOSITES),
    "position": [p for row in POSITIONS for p in row],
}
_REFERRING = re.compile(
    r"^(?P<size>{size}) (?P<color>{color}) (?:(?P<texture>{texture}) )?(?P<category>{category}) "
    r"in the (?P<position>{position}) of the image$".format(
        **{k: "|".join(sorted(map(re.escape, v), key=len, reverse=True)) for k, v in _ALTERNATIVES.items()}))


def referring_attributes(phrase: str, category: str) -> dict[str, str]:
    """'small red striped triangle in the top left of the image' -> {color, size, position, texture}; a simple
    shape without a texture word is `solid`, a composite object has no texture."""
    match = _REFERRING.match(phrase)
    if match is None or match["category"] != category:
        raise ValueError(f"not a generated referring expression of a {category}: {phrase!r}")
    attributes = {"color": match["color"], "size": match["size"], "position": match["position"]}
    if category in SHAPES:
        attributes["texture"] = match["texture"] or "solid"
    return attributes


def export_coco(data: str | Path, split: str) -> dict[str, Any]:
    """The COCO instances dict (`images`, `annotations` with RLE `segmentation` and `attributes`, `categories`)
    of one split of a generated dataset; `file_name`s are relative to `data`, as in its records."""
    data = Path(data)
    categories = {name: i for i, name in enumerate(list(SHAPES) + list(COMPOSITES), start=1)}
    referring = {record.id: record for _, record in iter_records(data / split / "stage2_referring.json")}
    images, annotations = [], []
    for _, record in iter_records(data / split / "stage2_categories.json"):
        images.append({"id": record.id, "file_name": record.file_name, "height": record.height,
                       "width": record.width})
        phrases = dict(region_descriptions(referring[record.id]))
        for k, category in region_descriptions(record):
            region = record.annotation[k - 1].model_dump(exclude_none=True)
            annotations.append({
                "id": int(record.id) * ANNOTATION_ID_STRIDE + k, "image_id": record.id,
                "category_id": categories[category], "segmentation": region["segmentation"], "bbox": region["bbox"],
                "area": region.get("area", 0), "iscrowd": 0, "attributes": referring_attributes(phrases[k], category),
            })
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in categories.items()]}
