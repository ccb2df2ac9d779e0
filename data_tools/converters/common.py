"""Shared pieces of the converters: statistics, region checks, seeded shuffling, conversation builders.

Conventions of every converted record (so the sample builder can treat them alike):
- texts never contain `<image>` (the sample builder puts it in front of the first human turn);
- regions are named `<regionK>` in annotation order; stage-2 style records have one human turn per region
  (the dataset instruction opens the first one) and the answer is the label;
- a record-level `source` field names the dataset; regions keep `category_id`/`category_name` and the
  source annotation id as `ann_id`.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from osprey.masks import MaskError, MaskWarning, decode_mask, mask_to_bbox

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Stage-2 instructions opening the first human turn. Wording follows the official stage-2 datasets
# (osprey/datasets/stage2_data.py) as far as we know it (unverified against the release).
CATEGORY_INSTRUCTION = (
    "In the conversation below, you simply answer the category name based on what you see in the imagery "
    "inside a particular region. I will give you only one region each time."
)
PART_INSTRUCTION = (
    "In the conversation below, you simply answer the category and subcategory name based on what you see "
    "in the image inside a particular region. It maybe a subpart of an object. I will give you only one "
    "region each time. Your answer should in the format of category:subcategory."
)
REFERRING_INSTRUCTION = (
    "I will provide you with only one region containing only one object, although there may be other "
    "objects present in the image. It is recommended that you describe the object's relative position with "
    "respect to other objects in the image, as well as its position within the image and its basic attributes."
)
SHORT_CAPTION_QUESTION = "Please give me a short description of {region}."
OPEN_VOCAB_QUESTION = "What is in {region}? Using a short phrase."


@dataclass
class ConvertStats:
    """What a conversion did: counts of images, records, regions and of everything skipped (by reason)."""

    images: int = 0
    records: int = 0
    regions: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first offending item

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = what
            logger.warning("skipping %s: %s", what, reason)

    def summary(self) -> str:
        lines = [f"images seen: {self.images}", f"records written: {self.records}",
                 f"regions written: {self.regions}"
                 + (f" ({self.regions / self.records:.2f} per record)" if self.records else "")]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"skipped ({reason}): {count}  e.g. {self.examples[reason]}")
        return "\n".join(lines)


def load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checked_region(segmentation: Any, height: int, width: int, what: str, stats: ConvertStats) -> list[float] | None:
    """Decode `segmentation` once to make sure it is usable; returns its COCO bbox, or None (skip, counted)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MaskWarning)  # self-intersecting COCO polygons are kept
            mask = decode_mask(segmentation, height, width)
    except MaskError as exc:
        stats.skip("undecodable mask", f"{what} ({exc})")
        return None
    if not mask.any():
        stats.skip("empty mask", what)
        return None
    return mask_to_bbox(mask)


def shuffled_capped(items: Sequence[T], cap: int | None, rng: random.Random) -> list[T]:
    """Seeded shuffle, then keep the first `cap` (all if None or <= 0), as the official stage-2 loaders do."""
    out = list(items)
    rng.shuffle(out)
    return out if cap is None or cap <= 0 else out[:cap]


def one_turn_per_region(instruction: str | None, answers: Sequence[str]) -> list[dict[str, str]]:
    """Stage-2 conversation: human `<regionK>` (instruction before the first), gpt = label."""
    turns: list[dict[str, str]] = []
    for k, answer in enumerate(answers, start=1):
        question = f"<region{k}>"
        if k == 1 and instruction:
            question = f"{instruction}\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def question_per_region(question: str, answers: Sequence[str]) -> list[dict[str, str]]:
    """One `question` (with `{region}`) per region, each answered by its label."""
    turns: list[dict[str, str]] = []
    for k, answer in enumerate(answers, start=1):
        turns += [{"from": "human", "value": question.format(region=f"<region{k}>")},
                  {"from": "gpt", "value": answer}]
    return turns


def display_name(name: str) -> str:
    """LVIS-style category name -> answer text: underscores become spaces ("baseball_bat" -> "baseball bat")."""
    return name.replace("_", " ").strip()


def file_name_from_url(url: str, parts: int = 2) -> str:
    """Last `parts` path components of an image URL ("http://.../val2017/0001.jpg" -> "val2017/0001.jpg")."""
    pieces = [p for p in urlparse(url).path.split("/") if p]
    return "/".join(pieces[-parts:])


def group_by(items: Iterable[Mapping[str, Any]], key: str) -> dict[Any, list[Mapping[str, Any]]]:
    out: dict[Any, list[Mapping[str, Any]]] = {}
    for item in items:
        out.setdefault(item[key], []).append(item)
    return out
