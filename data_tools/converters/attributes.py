"""COCO annotations with attributes (+ a CSV of labels) -> stage-3 short-answer, label-list and yes/no records.

A user's own labels reach the model this way (docs/finetune.md). A region's labels come from two places:
- the annotation's `attributes` field: `{"color": "red", "material": ["cotton", "wool"]}` (name -> value or values)
  or a plain list of labels `["striped", "sale"]`;
- a CSV with a header naming `id` (the annotation id) and `labels` (labels separated by ";"), one row per region.
Named values answer "what is its <name>?" questions; every label of a region (named and unnamed) makes its label
list and its yes/no questions. The records are conversations naming each region `<regionK>`; the stage-3 kind
they are read as picks the prompt form (`osprey.data.samples`): `short_form` (the official short-answer form:
every region listed up front, the question's " Answer the question using a single word or phrase." suffix),
`region_qa` (the region inline in the question, as `osprey serve` asks a custom question), `pos_neg` (yes/no).
The category is asked too, in several wordings (`CATEGORY_QUESTIONS`), so that a model learns the question and not
one sentence; `bench/category_wordings.txt` holds other wordings for the evaluation. A record's questions come in a
random order (seeded by `seed`, the task and the image id), not region by region.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_tools.converters.common import ConvertStats, load_json
from data_tools.converters.instances import chosen_regions, image_record, region_entry
from osprey.data.records import Record

AttributeTask = Literal["short_answer", "label_list", "yes_no"]
ATTRIBUTE_TASKS: tuple[str, ...] = ("short_answer", "label_list", "yes_no")
CATEGORY = "category"  # the name under which the category is asked like any attribute
LABEL_SEPARATOR = ";"  # between the labels of one CSV cell

# Training wordings of the category question ({region} = `<regionK>`); the official category prompt is the task
# kind `task_category`. The evaluation's wordings (bench/category_wordings.txt) are written apart from these.
CATEGORY_QUESTIONS: tuple[str, ...] = (
    "What is {region}?",
    "What is in {region}?",
    "What is the object in {region}?",
    "What object is {region}?",
    "What kind of object is {region}?",
    "What is the category of {region}?",
    "Which category does {region} belong to?",
    "Name the object in {region}.",
    "What do you see in {region}?",
    "What is shown in {region}?",
    "Identify {region}.",
    "What type of thing is {region}?",
    "Tell me what {region} is.",
    "Can you name {region}?",
    "What is the name of the object in {region}?",
    "Which object is marked by {region}?",
    "What am I looking at in {region}?",
    "What is inside {region}?",
    "Please name the object in {region}.",
    "What object can be seen in {region}?",
    "Classify {region}.",
    "Which object is {region}?",
    "What category is {region}?",
    "What does {region} contain?",
    "{region}: what is it?",
    "Describe {region} in one word.",
    # Requests phrased as questions ("Can you ...?"), and the region followed by more words: the yes/no data
    # ("Is <region> red?") owns both shapes, so without these a model answers such a category question "Yes"/"No".
    "Can you tell me what {region} is?",
    "Could you name {region}?",
    "Would you say what is in {region}?",
    "Can you say which object {region} shows?",
    "Please say what {region} is.",
    "Tell me the category of {region}.",
    "What name does {region} have?",
    "What is {region} known as?",
    "What would you name {region}?",
    "Which object do you find in {region} here?",
    "What object does {region} show in this image?",
    "{region} shows which object?",
)
# Wordings of a named attribute's question ({name}: the attribute's name as the file spells it).
ATTRIBUTE_QUESTIONS: tuple[str, ...] = (
    "What {name} is {region}?",
    "What is the {name} of {region}?",
    "Which {name} is {region}?",
    "What {name} does {region} have?",
    "Tell me the {name} of {region}.",
)
LABEL_LIST_QUESTION = "What are the labels of {region}? List them."
YES_NO_QUESTIONS: dict[str, str] = {
    CATEGORY: "Is there {article} {value} in {region}?",  # the generated data's form of the category question
    "": "Is {region} {value}?",  # any other label
}


@dataclass
class RegionLabels:
    """What is known about one region: its category, named attribute values, and unnamed labels."""

    category: str
    named: dict[str, list[str]] = field(default_factory=dict)  # attribute name -> values, in the file's order
    unnamed: list[str] = field(default_factory=list)

    def all_labels(self) -> list[str]:
        """Every label, named values first (name by name), each once."""
        out: list[str] = []
        for value in [v for values in self.named.values() for v in values] + self.unnamed:
            if value not in out:
                out.append(value)
        return out


def read_label_csv(path: str | Path) -> dict[int, list[str]]:
    """`id,labels` CSV -> annotation id -> labels (";"-separated in the cell; blanks dropped)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "labels"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the CSV needs a header with 'id' and 'labels' columns, got {reader.fieldnames}")
        out: dict[int, list[str]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                ann_id = int(row["id"])
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {line}: id {row['id']!r} is not an annotation id (an integer)") from None
            labels = [label.strip() for label in (row["labels"] or "").split(LABEL_SEPARATOR) if label.strip()]
            out.setdefault(ann_id, []).extend(labels)
        return out


def parse_attributes(ann: Mapping[str, Any], category: str, extra: list[str]) -> RegionLabels:
    """The annotation's `attributes` (a name -> value/values mapping, or a list of labels) plus CSV labels."""
    labels = RegionLabels(category=category, unnamed=list(extra))
    raw = ann.get("attributes")
    what = f"annotation {ann.get('id')}: attributes"
    if raw is None:
        return labels
    if isinstance(raw, list):
        if not all(isinstance(v, str) for v in raw):
            raise ValueError(f"{what} must be a list of strings or a name -> value mapping, got {raw!r}")
        labels.unnamed = [v.strip() for v in raw if v.strip()] + labels.unnamed
        return labels
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} must be a list of strings or a name -> value mapping, got {type(raw).__name__}")
    for name, value in raw.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{what}[{name!r}] must be a string or a list of strings, got {value!r}")
        values = [v.strip() for v in values if v.strip()]
        if values:
            labels.named[str(name)] = values
    return labels


def convert_coco_attributes(instances: str, task: AttributeTask, *, labels: str | None = None, seed: int = 0,
                            max_regions: int | None = 15, stats: ConvertStats | None = None,
                            progress: bool = True) -> Iterator[Record]:
    """COCO instances (+ label CSV) -> one record per image of `task` questions about each of its regions."""
    if task not in ATTRIBUTE_TASKS:
        raise ValueError(f"unknown attribute task {task!r}; known: {list(ATTRIBUTE_TASKS)}")
    stats = stats or ConvertStats()
    data = load_json(instances)
    categories = {c["id"]: c for c in data["categories"]}
    extra = read_label_csv(labels) if labels is not None else {}
    known_ids = {ann.get("id") for ann in data["annotations"]}
    for ann_id in sorted(set(extra) - known_ids):
        stats.skip("CSV labels of an unknown annotation id", f"id {ann_id}")
    region_labels = {id(ann): parse_attributes(ann, categories[ann["category_id"]]["name"], extra.get(ann.get("id"), []))
                     for ann in data["annotations"] if ann["category_id"] in categories}
    vocabulary = _vocabulary(region_labels.values())
    for image, chosen in chosen_regions(data, "coco", categories=categories, seed=seed, max_regions=max_regions,
                                        stats=stats, progress=progress):
        rng = random.Random(f"{seed}:{task}:{image['id']}")
        turns: list[tuple[str, str]] = []
        for k, ann in enumerate(chosen, start=1):
            turns += _region_turns(task, region_labels[id(ann)], f"<region{k}>", vocabulary, rng)
        # Asked region by region, turn t would mostly be about region t, and a model learns to read the region by
        # the turn instead of by its name (version 6 did on the generated data: docs/finetune.md, "The cause
        # found"); in a seeded random order the turn says nothing about the region.
        rng.shuffle(turns)
        if not turns:
            stats.skip(f"no labels to ask about ({task})", f"image {image['id']}")
            continue
        conversation = [{"from": role, "value": text} for q, a in turns for role, text in (("human", q), ("gpt", a))]
        stats.records += 1
        stats.regions += len(chosen)
        yield image_record(image, [region_entry(ann, categories) for ann in chosen], conversation, "coco")


def _vocabulary(all_labels: Iterator[RegionLabels] | Any) -> dict[str, list[str]]:
    """Attribute name -> every value seen (CATEGORY: categories, "": unnamed labels), in first-seen order: the
    values a yes/no question may ask about falsely."""
    seen: dict[str, dict[str, None]] = defaultdict(dict)
    for labels in all_labels:
        seen[CATEGORY][labels.category] = None
        for name, values in labels.named.items():
            seen[name].update(dict.fromkeys(values))
        seen[""].update(dict.fromkeys(labels.unnamed))
    return {name: list(values) for name, values in seen.items()}


def _region_turns(task: str, labels: RegionLabels, region: str, vocabulary: Mapping[str, list[str]],
                  rng: random.Random) -> list[tuple[str, str]]:
    """The (question, answer) turns of one region for a task; the wordings are drawn by `rng`."""
    if task == "label_list":
        found = labels.all_labels()
        return [(LABEL_LIST_QUESTION.format(region=region), ", ".join(found))] if found else []
    if task == "short_answer":
        turns = [(rng.choice(CATEGORY_QUESTIONS).format(region=region), labels.category)]
        for name, values in labels.named.items():
            if len(values) == 1:  # several values are a list: the label-list task asks for them
                turns.append((rng.choice(ATTRIBUTE_QUESTIONS).format(name=name, region=region), values[0]))
        return turns
    asked = [(CATEGORY, [labels.category])] + list(labels.named.items()) + ([("", labels.unnamed)] if labels.unnamed else [])
    return [_yes_no(name, values, region, vocabulary[name], rng) for name, values in asked]


def _yes_no(name: str, values: list[str], region: str, pool: list[str], rng: random.Random) -> tuple[str, str]:
    """A true question about one of the values half the time, else about a value of the same attribute seen on
    other regions; a true one when no other value exists."""
    others = [v for v in pool if v not in values]
    truthful = rng.random() < 0.5 or not others
    value = rng.choice(values) if truthful else rng.choice(others)
    form = YES_NO_QUESTIONS.get(name, YES_NO_QUESTIONS[""])
    question = form.format(article="an" if value[:1].lower() in "aeiou" else "a", value=value, region=region)
    return question, "Yes" if truthful else "No"
