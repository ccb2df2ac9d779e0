"""One generated image -> its Osprey-724K records, one per sub-set (JSON-ready dicts).

Sub-sets mirror the official ones: stage 1 image captions; stage 2 one-label-per-region lists (categories,
parts, referring expressions) written as `description` entries `"<regionK>: label"`; stage 3 conversations,
short-form, part-level, positive/negative and detailed descriptions. Every record of an image lists its
regions in `annotation` (COCO RLE + box); stage-3 records list them in a random order so that region numbers
carry no hint of depth or position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_tools.synth.scene import Part, Scene, SceneObject, mask_bbox
from data_tools.synth.texts import (
    conversation_turns,
    detailed_description,
    image_caption,
    name,
    part_regions,
    part_turns,
    pos_neg_turns,
    short_form_turns,
    where,
)
from osprey.masks import encode_rle

# name -> (stage, kind); `kind` selects the sample builder in osprey.data.samples.
SUBSETS: dict[str, tuple[int, str]] = {
    "stage1_captions": (1, "captions"),
    "stage2_categories": (2, "categories"),
    "stage2_parts": (2, "parts"),
    "stage2_referring": (2, "referring"),
    "stage3_conversations": (3, "conversations"),
    "stage3_short_form": (3, "short_form"),
    "stage3_parts": (3, "parts"),
    "stage3_pos_neg": (3, "pos_neg"),
    "stage3_detailed": (3, "detailed"),
}

# Stage-1 instructions (LLaVA-pretrain style); the image placeholder sits before or after, as in LLaVA's data.
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short caption of the picture.",
    "What is in this image?",
    "Summarize the picture in one sentence.",
    "Write a brief description of the image.",
)


def _region(mask: np.ndarray, category: str, **extra: Any) -> dict[str, Any]:
    x, y, w, h = mask_bbox(mask)
    return {"segmentation": encode_rle(mask), "bbox": [x, y, w, h], "area": int(mask.sum()),
            "category_name": category, **extra}


def _conversation(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for question, answer in turns:
        out.append({"from": "human", "value": question})
        out.append({"from": "gpt", "value": answer})
    return out


def _object_region(obj: SceneObject) -> dict[str, Any]:
    return _region(obj.visible, obj.category)


def _part_region(obj: SceneObject, part: Part) -> dict[str, Any]:
    return _region(part.visible, part.name, parent=obj.category)


def scene_records(scene: Scene, image_id: int, file_name: str, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Records of one scene keyed by sub-set name (a sub-set is missing when the scene has nothing for it)."""
    base = {"id": image_id, "file_name": file_name, "height": scene.size, "width": scene.size}
    objects = scene.objects
    in_order = [_object_region(o) for o in objects]  # back to front
    order = [int(i) for i in rng.permutation(len(objects))]
    shuffled = [in_order[i] for i in order]
    parts = part_regions(scene)
    part_annotation = [_part_region(o, p) for o, p in parts]

    instruction = CAPTION_INSTRUCTIONS[int(rng.integers(len(CAPTION_INSTRUCTIONS)))]
    human = f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"
    records: dict[str, dict[str, Any]] = {
        "stage1_captions": {**base, "annotation": in_order,
                            "conversations": _conversation([(human, image_caption(scene))])},
        "stage2_categories": {**base, "annotation": in_order,
                              "description": [f"<region{k + 1}>: {o.category}" for k, o in enumerate(objects)]},
        "stage2_referring": {**base, "annotation": in_order,
                             "description": [f"<region{k + 1}>: {name(o)} {where(o.position)}"
                                             for k, o in enumerate(objects)]},
        "stage3_conversations": {**base, "annotation": shuffled,
                                 "conversations": _conversation(conversation_turns(rng, scene, order))},
        "stage3_short_form": {**base, "annotation": shuffled,
                              "conversations": _conversation(short_form_turns(rng, scene, order))},
        "stage3_pos_neg": {**base, "annotation": shuffled,
                           "conversations": _conversation(pos_neg_turns(rng, scene, order))},
        "stage3_detailed": {**base, "annotation": shuffled,
                            "description": [f"<region{k + 1}>: {detailed_description(scene, i)}"
                                            for k, i in enumerate(order)]},
    }
    if parts:
        records["stage2_parts"] = {**base, "annotation": part_annotation,
                                   "description": [f"<region{k + 1}>: {o.category}:{p.name}"
                                                   for k, (o, p) in enumerate(parts)]}
        records["stage3_parts"] = {**base, "annotation": part_annotation,
                                   "conversations": _conversation(part_turns(rng, parts))}
    return {name_: records[name_] for name_ in SUBSETS if name_ in records}
