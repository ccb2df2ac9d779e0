"""Stage-specific training samples from Osprey-724K-style records (spec sections 6 and 8).

A `Sample` is what the tokenizer and the model need and nothing more: the messages as (role, text) with
`<image>` and `<mask><pos>` placeholders, the region segmentations in the order their `<mask>` tokens occur
(decoded only on demand), and the image path. The strings follow the official data loaders:

- stage 1 (captions): the record's conversation; `<image>` moved to the very front of the first human turn.
- stage 2 (one label per region): one multi-turn conversation per image, a turn per region whose human text is
  just `<mask><pos>`; regions shuffled and capped (COCO-style categories 20, others 15); an opening instruction
  per dataset kind before the first region.
- stage 3 conversations / short-form / parts: the multi-region prefix listing every region, then the question
  (`<regionK>` written `regionK`); short-form and part questions end with " Answer the question using a single
  word or phrase.".
- stage 3 positive/negative and detailed descriptions: as in the official loaders, each question carries its
  region as `<mask><pos>` in place of `<regionK>`, and the first question is opened by the overview line;
  `region_qa` reads any conversation so (the form of a custom question to `osprey serve`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osprey.data.records import (
    DESCRIPTION_ENTRY,
    REGION_REF,
    Record,
    Region,
    decode_region_mask,
    parse_record,
)
from osprey.prompts import (
    IMAGE_PLACEHOLDER,
    OVERVIEW_PREFIX,
    REGION_PLACEHOLDER,
    inline_region_question,
    multi_region_question,
    task_prompt,
)

__all__ = [
    "DEFAULT_REGION_CAP",
    "DETAILED_QUESTIONS",
    "OVERVIEW",
    "SHORT_ANSWER_SUFFIX",
    "STAGE2_OPENINGS",
    "STAGE2_REGION_CAPS",
    "STAGE_KINDS",
    "Sample",
    "build_sample",
    "build_stage1",
    "build_stage2",
    "build_stage3",
    "image_first",
    "region_descriptions",
    "region_labels",
    "rewrite_region_refs",
]

OVERVIEW = OVERVIEW_PREFIX  # "<image>\nThis provides an overview of the picture.\n"
SHORT_ANSWER_SUFFIX = " Answer the question using a single word or phrase."

# Which kinds each stage serves; `kind` names the dataset family a record file belongs to.
STAGE_KINDS: dict[int, tuple[str, ...]] = {
    1: ("captions",),
    2: ("categories", "referring", "parts"),
    3: ("conversations", "short_form", "parts", "pos_neg", "detailed",
        # Any single-region question with the region inline, the form `osprey serve` gives a custom question
        # (the pos_neg builder): converted attribute records read this way teach questions as users ask them.
        "region_qa",
        # Single-region samples in the exact form of the inference prompts (osprey.prompts.TASK_PROMPTS), from
        # records whose `description` holds each region's answer: they teach a model trained from scratch the
        # prompts the server and eval use.
        "task_category", "task_open_vocab", "task_short", "task_refcocog", "task_detailed"),
}

# Stage-2 openings per kind, after the official COCO / RefCOCO / part-dataset loaders (the part-dataset text
# leaves out the official category lists and fixes its missing space). They follow `<image>\n`; the first
# region's `<mask><pos>` follows them directly.
STAGE2_OPENINGS: dict[str, str] = {
    "categories": (
        "In the conversation below, you simply answer the category name based on what you see in the imagery "
        "inside a particular region. I will give you only one region each time.\n"
    ),
    "referring": (
        "I will provide you with only one region containing only one object, although there may be other "
        "objects present in the image. It is recommended that you describe the object's relative position with "
        "respect to other objects in the image, as well as its position within the image and its basic attributes."
    ),
    "parts": (
        "In the conversation below, you simply answer the category and subcategory name based on what you see "
        "in the image inside a particular region. It maybe a subpart of an object. I will give you only one "
        "region each time. Your answer should in the format of category:subcategory.\n"
    ),
}
STAGE2_REGION_CAPS: dict[str, int] = {"categories": 20}  # COCO instances: 20; every other stage-2 set: 15
DEFAULT_REGION_CAP = 15

# The official detailed-description questions (osprey/datasets/osprey_724k.py), typos included: the model was
# trained on these strings. `<region>` becomes the region's `<mask><pos>`.
DETAILED_QUESTIONS: tuple[str, ...] = (
    "Can you provide me with a detailed description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail?",
    "What details can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image.",
    "Can you give me a detailed account of the region labeled as <region> in the picture?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail?",
    "What is the region outlined by <region> in the picture like? Could you give me a detailed description?",
    "Can you provide me with a detailed description of the region in the picture marked by <region>, please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail, please?",
    "What can you tell me about the region indicated by <region> in the image, exactly?",
    "I'd like to know more about the area in the photo labeled <region>, please. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail, please?",
    "What details can you give me about the region outlined by <region> in the photo, please?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image, please.",
    "Can you give me a detailed account of the region labeled as <region> in the picture, please?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail, please?",
    "What is the region outlined by <region> in the picture like, please? Could you give me a detailed description?",
    "Please describe the region <region> in the image in detail.",
    "Can you offer a thorough analysis of the region <region> in the image?",
    "Could you elaborate on the region highlighted by <region> in the picture provided?",
    "Please share more information about the zone emphasized with <region> in the photo.",
    "What insights can you give ablout the area denoted by <region> in the image presented?",
    "Can you share a comprehensive rundown of the region denoted by <region> in the presented image?",
    "I'd like to know more about the region highlighted by <region> in the picture provided.",
    "Work through the important details of the area <region> in the image.",
    "Illustrate the area represtented by <region> through a descriptive explanation.",
    "Examine the region <region> closely and share its details.",
)

_IMAGE_AND_NEWLINES = re.compile(r"\n*" + re.escape(IMAGE_PLACEHOLDER) + r"\n*")


@dataclass(frozen=True)
class Sample:
    """One training conversation. `regions[i]` binds to the i-th `<mask>` of the rendered text."""

    messages: tuple[tuple[str, str], ...]  # ("human" | "gpt", text), alternating, human first
    regions: tuple[Region, ...]  # segmentations in binding order; decode with `masks()`
    image_path: Path
    height: int
    width: int

    def masks(self) -> list[np.ndarray]:
        """The region masks, each `(height, width) bool`, in binding order (decoded now, not stored)."""
        return [decode_region_mask(region, self.height, self.width) for region in self.regions]

    @property
    def num_mask_tokens(self) -> int:
        return sum(text.count(REGION_PLACEHOLDER) for _, text in self.messages)


def image_first(text: str) -> str:
    """LLaVA's rule: drop every `<image>` (and the newlines around it) and put one `<image>\\n` in front."""
    return IMAGE_PLACEHOLDER + "\n" + _IMAGE_AND_NEWLINES.sub("", text).strip()


def rewrite_region_refs(text: str) -> str:
    """`<regionK>` -> `regionK` (the multi-region prefix already bound each regionK to its mask)."""
    return REGION_REF.sub(r"region\1", text)


def _check_refs(record: Record, text: str) -> None:
    n = len(record.annotation)
    bad = [k for k in (int(m) for m in REGION_REF.findall(text)) if not 1 <= k <= n]
    if bad:
        raise ValueError(f"record {record.id}: text refers to <region{bad[0]}> but it has {n} region(s): {text[:80]!r}")


def _turns(record: Record) -> list[tuple[str, str]]:
    if record.conversations is None:
        raise ValueError(f"record {record.id} has no 'conversations' (it has a 'description')")
    turns = [(turn.speaker, turn.value) for turn in record.conversations]
    if len(turns) < 2 or len(turns) % 2 or any(role != ("human", "gpt")[i % 2] for i, (role, _) in enumerate(turns)):
        raise ValueError(f"record {record.id}: conversation must alternate human/gpt and end with gpt, "
                         f"got roles {[role for role, _ in turns]}")
    return turns


def region_descriptions(record: Record) -> list[tuple[int, str]]:
    """(region number, text) for each `"<regionK>: text"` description entry."""
    if record.description is None:
        raise ValueError(f"record {record.id} has no 'description' (it has 'conversations')")
    out = []
    for entry in record.description:
        match = DESCRIPTION_ENTRY.match(entry)
        if match is None:
            raise ValueError(f"record {record.id}: description entry is not '<regionK>: text': {entry[:60]!r}")
        k = int(match.group(1))
        if not 1 <= k <= len(record.annotation):
            raise ValueError(f"record {record.id}: description names <region{k}> but it has "
                             f"{len(record.annotation)} region(s)")
        out.append((k, match.group(2).strip()))
    return out


def region_labels(record: Record) -> list[tuple[int, str]]:
    """(region number, label) per region of a one-label-per-region record, in either of its two forms: the
    generated data's `"<regionK>: label"` description entries, or the converters' stage-2 conversation (each
    human turn names exactly one region, after an optional instruction; the gpt turn is its label), so that a
    converted COCO file serves every stage-2 kind, the task kinds and detailed samples alike."""
    if record.description is not None:
        return region_descriptions(record)
    out = []
    for turn in range(0, len(_turns(record)), 2):
        question, answer = record.conversations[turn].value, record.conversations[turn + 1].value
        refs = REGION_REF.findall(question)
        if len(refs) != 1:
            raise ValueError(f"record {record.id}: a one-label-per-region conversation names one region per "
                             f"question; turn {turn} names {len(refs)}: {question[-80:]!r}")
        _check_refs(record, question)
        out.append((int(refs[0]), answer.strip()))
    return out


def _sample(record: Record, image_root: Path, messages: list[tuple[str, str]], regions: Sequence[Region]) -> Sample:
    sample = Sample(tuple(messages), tuple(regions), Path(image_root) / record.file_name, record.height, record.width)
    assert sample.num_mask_tokens == len(sample.regions), "builder bound a different number of masks than <mask>s"
    return sample


def build_stage1(record: Record, image_root: Path) -> Sample:
    """Image-caption pair(s): the record's conversation with `<image>` moved to the front; no regions."""
    turns = _turns(record)
    named = REGION_REF.findall(" ".join(text for _, text in turns))
    if named:
        raise ValueError(f"record {record.id}: stage 1 trains on image captions, but this conversation names "
                         f"regions (<region{named[0]}>); region records (e.g. converted COCO) are stage-2 or "
                         f"stage-3 data")
    turns[0] = ("human", image_first(turns[0][1]))
    for role, text in turns[1:]:
        if IMAGE_PLACEHOLDER in text:
            raise ValueError(f"record {record.id}: <image> outside the first human turn ({role}: {text[:60]!r})")
    return _sample(record, image_root, turns, [])


def build_stage2(record: Record, kind: str, image_root: Path, rng: np.random.Generator) -> Sample:
    """One turn per region (`<mask><pos>` -> label), regions shuffled by `rng` and capped per kind."""
    if kind not in STAGE2_OPENINGS:
        raise ValueError(f"unknown stage-2 kind {kind!r}; known: {sorted(STAGE2_OPENINGS)}")
    labels = region_labels(record)
    cap = STAGE2_REGION_CAPS.get(kind, DEFAULT_REGION_CAP)
    order = rng.permutation(len(labels))[:cap]
    messages: list[tuple[str, str]] = []
    regions: list[Region] = []
    for turn, index in enumerate(order):
        k, label = labels[int(index)]
        question = REGION_PLACEHOLDER
        if turn == 0:
            question = IMAGE_PLACEHOLDER + "\n" + STAGE2_OPENINGS[kind] + question
        messages += [("human", question), ("gpt", label)]
        regions.append(record.annotation[k - 1])
    return _sample(record, image_root, messages, regions)


def build_stage3(record: Record, kind: str, image_root: Path, rng: np.random.Generator) -> Sample:
    """Stage-3 instruction sample of one kind (see the module docstring for the exact strings)."""
    if kind in ("conversations", "short_form", "parts"):
        return _multi_region(record, image_root, suffix="" if kind == "conversations" else SHORT_ANSWER_SUFFIX)
    if kind in ("pos_neg", "region_qa"):
        return _inline_regions(record, image_root)
    if kind == "detailed":
        return _detailed(record, image_root, rng)
    if kind.startswith("task_"):
        return _task_prompt(record, kind.removeprefix("task_"), image_root, rng)
    raise ValueError(f"unknown stage-3 kind {kind!r}; known: {list(STAGE_KINDS[3])}")


def _multi_region(record: Record, image_root: Path, suffix: str) -> Sample:
    """Every region listed once up front (binding order = annotation order), questions use `regionK`."""
    messages: list[tuple[str, str]] = []
    for i, (role, text) in enumerate(_turns(record)):
        _check_refs(record, text)
        text = rewrite_region_refs(text)
        if role == "human":
            if IMAGE_PLACEHOLDER in text:
                raise ValueError(f"record {record.id}: stage-3 questions must not contain <image>: {text[:60]!r}")
            if i == 0:
                text = multi_region_question(len(record.annotation), text)
            text += suffix
        messages.append((role, text))
    return _sample(record, image_root, messages, record.annotation)


def _inline_regions(record: Record, image_root: Path) -> Sample:
    """Each `<regionK>` in a question becomes `<mask><pos>` bound to region K, in order of occurrence."""
    messages: list[tuple[str, str]] = []
    regions: list[Region] = []
    for i, (role, text) in enumerate(_turns(record)):
        _check_refs(record, text)
        if role == "human":
            regions += [record.annotation[int(k) - 1] for k in REGION_REF.findall(text)]
            text = REGION_REF.sub(REGION_PLACEHOLDER, text)
            if i == 0:
                text = inline_region_question(text)
        else:
            text = rewrite_region_refs(text)
        messages.append((role, text))
    return _sample(record, image_root, messages, regions)


def _detailed(record: Record, image_root: Path, rng: np.random.Generator) -> Sample:
    """One turn per description entry: a detailed-description question about that region, then its text."""
    messages: list[tuple[str, str]] = []
    regions: list[Region] = []
    for turn, (k, text) in enumerate(region_labels(record)):
        question = DETAILED_QUESTIONS[int(rng.integers(len(DETAILED_QUESTIONS)))].replace("<region>", REGION_PLACEHOLDER)
        if turn == 0:
            question = inline_region_question(question)
        messages += [("human", question), ("gpt", rewrite_region_refs(text))]
        regions.append(record.annotation[k - 1])
    return _sample(record, image_root, messages, regions)


def _task_prompt(record: Record, task: str, image_root: Path, rng: np.random.Generator) -> Sample:
    """One region (drawn by `rng`) asked with the task's inference prompt; the answer is its description."""
    entries = region_labels(record)
    if not entries:
        raise ValueError(f"record {record.id}: task samples need `description` entries")
    k, text = entries[int(rng.integers(len(entries)))]
    messages = [("human", task_prompt(task)), ("gpt", rewrite_region_refs(text))]
    return _sample(record, image_root, messages, [record.annotation[k - 1]])


def build_sample(record: Record | Mapping[str, Any], stage: int, kind: str, image_root: str | Path,
                 rng: np.random.Generator) -> Sample:
    """The sample of `record` for a stage and kind; `rng` drives the stage-2 shuffle and question choice."""
    if stage not in STAGE_KINDS or kind not in STAGE_KINDS[stage]:
        raise ValueError(f"unknown stage/kind {stage}/{kind!r}; known: {STAGE_KINDS}")
    record = parse_record(record)
    image_root = Path(image_root)
    if stage == 1:
        return build_stage1(record, image_root)
    if stage == 2:
        return build_stage2(record, kind, image_root, rng)
    return build_stage3(record, kind, image_root, rng)
