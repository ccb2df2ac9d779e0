"""Class vocabularies for open-vocabulary segmentation: names, synonyms and thing/stuff flags, stored as data
files (`eval/data/<name>.json`) so a new dataset is a new file, not new code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SHIPPED = ("cityscapes", "ade20k_150")
DEFAULT_TEMPLATE = "There is a {} in the scene."  # the official region-classification template


@dataclass(frozen=True)
class ClassInfo:
    id: int  # dataset category id (the panoptic json's category_id)
    name: str
    isthing: bool
    synonyms: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    name: str
    template: str
    classes: tuple[ClassInfo, ...]

    def sentences(self) -> tuple[list[str], list[int]]:
        """Every filled template and the class index (0..K-1) it belongs to."""
        sents, owner = [], []
        for k, c in enumerate(self.classes):
            for syn in c.synonyms:
                sents.append(self.template.format(syn))
                owner.append(k)
        return sents, owner

    def index_of_id(self) -> dict[int, int]:
        return {c.id: k for k, c in enumerate(self.classes)}


def load_vocabulary(name_or_path: str) -> Vocabulary:
    """A shipped vocabulary (`cityscapes`, `ade20k_150`) or a JSON file of the same layout."""
    if name_or_path in SHIPPED:
        text = resources.files("eval").joinpath("data", f"{name_or_path}.json").read_text(encoding="utf-8")
        source = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"class list {name_or_path!r} is neither a shipped one {SHIPPED} nor a file"
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    data = json.loads(text)
    classes = []
    for n, c in enumerate(data["classes"]):
        synonyms = tuple(s.strip() for s in c.get("synonyms") or [c["name"]] if s.strip())
        if not synonyms:
            raise ValueError(f"{source}: class {n} ({c.get('name')!r}) has no synonyms")
        classes.append(ClassInfo(int(c["id"]), str(c["name"]), bool(c["isthing"]), synonyms))
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: class ids are not unique")
    template = data.get("template", DEFAULT_TEMPLATE)
    if template.count("{}") != 1:
        raise ValueError(f"{source}: template {template!r} must contain '{{}}' exactly once")
    return Vocabulary(data.get("name", source), template, tuple(classes))
