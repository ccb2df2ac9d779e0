"""COCO-style instance files -> stage-2 category records: COCO instances, LVIS v1 and PACO-LVIS.

One record per image, one human turn per region (`<regionK>`), the answer is the category name; regions
shuffled with a per-image seed and capped (COCO 20, others 15: spec section 8). Crowd annotations are
skipped; polygons and RLE are kept as they are in the source file.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from tqdm import tqdm

from data_tools.converters.common import (
    CATEGORY_INSTRUCTION,
    PART_INSTRUCTION,
    ConvertStats,
    checked_region,
    display_name,
    file_name_from_url,
    group_by,
    load_json,
    one_turn_per_region,
    shuffled_capped,
)
from osprey.data.records import Record, parse_record


def convert_coco(instances: str, *, task: str = "categories", labels: str | None = None, seed: int = 0,
                 max_regions: int | None = None, stats: ConvertStats | None = None,
                 progress: bool = True) -> Iterator[Record]:
    """`instances_*.json` -> records answering each region's COCO category name (`task` "categories", capped at
    20 regions), or, for the other tasks, stage-3 questions about the annotations' `attributes` and the `labels`
    CSV (`data_tools.converters.attributes`, capped at 15: stage 3 skips records with more)."""
    if task != "categories":
        from data_tools.converters.attributes import convert_coco_attributes

        yield from convert_coco_attributes(instances, task, labels=labels, seed=seed,  # type: ignore[arg-type]
                                           max_regions=15 if max_regions is None else max_regions, stats=stats,
                                           progress=progress)
        return
    if labels is not None:
        raise ValueError("--labels is for the attribute tasks (short_answer, label_list, yes_no), not categories")
    data = load_json(instances)
    categories = {c["id"]: c for c in data["categories"]}
    yield from _instance_records(
        data, "coco", lambda ann: categories[ann["category_id"]]["name"], CATEGORY_INSTRUCTION,
        categories=categories, seed=seed, max_regions=20 if max_regions is None else max_regions,
        stats=stats or ConvertStats(), progress=progress,
    )


def convert_lvis(annotations: str, *, seed: int = 0, max_regions: int | None = 15,
                 stats: ConvertStats | None = None, progress: bool = True) -> Iterator[Record]:
    """`lvis_v1_*.json` -> records answering each region's LVIS name (underscores as spaces); regions keep
    the category's `synonyms` (the open-vocabulary metrics use them)."""
    data = load_json(annotations)
    categories = {c["id"]: c for c in data["categories"]}
    yield from _instance_records(
        data, "lvis", lambda ann: display_name(categories[ann["category_id"]]["name"]), CATEGORY_INSTRUCTION,
        categories=categories, seed=seed, max_regions=max_regions, stats=stats or ConvertStats(), progress=progress,
    )


def convert_paco(annotations: str, *, kind: Literal["all", "part", "object"] = "all", seed: int = 0,
                 max_regions: int | None = 15, stats: ConvertStats | None = None,
                 progress: bool = True) -> Iterator[Record]:
    """PACO-LVIS json -> records answering object names ("dog") and part names as `obj:part` ("dog:ear").

    PACO names parts `object:part` in its categories; `kind` keeps parts, objects or both.
    """
    if kind not in ("all", "part", "object"):
        raise ValueError(f"kind must be 'all', 'part' or 'object', got {kind!r}")
    data = load_json(annotations)
    categories = {c["id"]: c for c in data["categories"]}

    def is_part(ann: Mapping[str, Any]) -> bool:
        return ":" in categories[ann["category_id"]]["name"]

    def answer(ann: Mapping[str, Any]) -> str:
        return ":".join(display_name(p) for p in categories[ann["category_id"]]["name"].split(":", 1))

    keep = {"all": lambda ann: True, "part": is_part, "object": lambda ann: not is_part(ann)}[kind]
    instruction = CATEGORY_INSTRUCTION if kind == "object" else PART_INSTRUCTION
    yield from _instance_records(
        data, "paco", answer, instruction, categories=categories, keep=keep, seed=seed,
        max_regions=max_regions, stats=stats or ConvertStats(), progress=progress,
    )


def _image_file_name(image: Mapping[str, Any]) -> str:
    """COCO and PACO images carry `file_name`; LVIS only `coco_url` (-> "val2017/000000397133.jpg")."""
    if image.get("file_name"):
        return str(image["file_name"])
    if image.get("coco_url"):
        return file_name_from_url(image["coco_url"])
    raise KeyError(f"image {image.get('id')} has neither 'file_name' nor 'coco_url'")


def chosen_regions(
    data: Mapping[str, Any],
    source: str,
    *,
    categories: Mapping[int, Mapping[str, Any]],
    seed: int,
    max_regions: int | None,
    stats: ConvertStats,
    progress: bool,
    keep: Callable[[Mapping[str, Any]], bool] = lambda ann: True,
) -> Iterator[tuple[Mapping[str, Any], list[Mapping[str, Any]]]]:
    """(image, its usable annotations shuffled with a per-image seed and capped) per image with any; crowd,
    unknown-category and undecodable annotations are skipped and counted."""
    anns_by_image = group_by(data["annotations"], "image_id")
    for image in tqdm(data["images"], desc=f"convert {source}", unit="img", disable=not progress):
        stats.images += 1
        height, width = int(image["height"]), int(image["width"])
        usable = []
        for ann in anns_by_image.get(image["id"], []):
            what = f"annotation {ann.get('id')} of image {image['id']}"
            if ann.get("iscrowd", 0):
                stats.skip("iscrowd", what)
                continue
            if ann["category_id"] not in categories:
                stats.skip("unknown category_id", f"{what} (category_id {ann['category_id']})")
                continue
            if not keep(ann):
                continue
            if checked_region(ann["segmentation"], height, width, what, stats) is None:
                continue
            usable.append(ann)
        if not usable:
            stats.skip("no usable regions", f"image {image['id']}")
            continue
        yield image, shuffled_capped(usable, max_regions, random.Random(f"{seed}:{image['id']}"))


def region_entry(ann: Mapping[str, Any], categories: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The record's region for a COCO annotation: its segmentation and box as they are, category, source id."""
    category = categories[ann["category_id"]]
    return {
        "segmentation": ann["segmentation"],
        "bbox": ann["bbox"],
        "category_id": ann["category_id"],
        "category_name": category["name"],
        "ann_id": ann.get("id"),
        **({"synonyms": category["synonyms"]} if "synonyms" in category else {}),
    }


def image_record(image: Mapping[str, Any], regions: list[dict[str, Any]], conversations: list[dict[str, str]],
                 source: str) -> Record:
    return parse_record({
        "id": image["id"],
        "file_name": _image_file_name(image),
        "height": int(image["height"]),
        "width": int(image["width"]),
        "annotation": regions,
        "conversations": conversations,
        "source": source,
    })


def _instance_records(
    data: Mapping[str, Any],
    source: str,
    answer: Callable[[Mapping[str, Any]], str],
    instruction: str,
    *,
    categories: Mapping[int, Mapping[str, Any]],
    seed: int,
    max_regions: int | None,
    stats: ConvertStats,
    progress: bool,
    keep: Callable[[Mapping[str, Any]], bool] = lambda ann: True,
) -> Iterator[Record]:
    for image, chosen in chosen_regions(data, source, categories=categories, seed=seed, max_regions=max_regions,
                                        stats=stats, progress=progress, keep=keep):
        record = image_record(image, [region_entry(ann, categories) for ann in chosen],
                              one_turn_per_region(instruction, [answer(ann) for ann in chosen]), source)
        stats.records += 1
        stats.regions += len(chosen)
        yield record
