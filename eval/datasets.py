"""Readers for the evaluation sets, each turned into flat per-region items.

Accepted layouts (detected from the file's content):
- classification: the official LVIS/PACO eval list (`categories` parallel to `annotations`), a COCO/LVIS/PACO
  json (`images` + `annotations` + `categories`), or Osprey-format records (regions with `category_name`,
  or conversations asking a region's category).
- captions: the official RefCOCOg json (COCO layout, one `caption` per image entry), COCO-style annotations
  carrying `caption`/`captions`, or Osprey-format records with `description` entries.
- detailed description: the official triple (questions, reference answers, context) or one list of items.
- POPE: the official JSON lines (`image`, `text`, `label`), or Osprey-format records whose questions about
  one region are answered yes/no.
- panoptic: a COCO-panoptic json + its PNG folder.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_REGION_TAG = re.compile(r"<region(\d+)>")


@dataclass(frozen=True)
class RegionItem:
    """One region of one image with what the command needs as ground truth (`target`)."""

    key: str
    image: str
    height: int
    width: int
    segmentation: Any  # COCO polygons / RLE, or None for a whole-image question
    target: Any  # category name | list of reference captions | yes/no label | reference answer
    question: str | None = None
    extra: dict = field(default_factory=dict)


def load_json_or_jsonl(path: str | Path) -> Any:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines under another suffix (the official POPE files are .json but hold lines)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {exc}") from None


def resolve_image(root: str | Path | None, file_name: str) -> str:
    """`root/file_name`; like the official scripts, falls back to the part after the last '_'
    (`COCO_train2014_000000123.jpg` -> `000000123.jpg`) when only that file exists."""
    base = Path(root) if root else Path(".")
    path = base / file_name
    if not path.exists():
        alt = base / file_name.split("_")[-1]
        if alt.exists():
            return str(alt)
    return str(path)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) read from the image header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def _file_name(image: dict) -> str:
    """COCO-style image entry -> its file name (LVIS v1 gives only `coco_url`: its last path part)."""
    if "file_name" in image:
        return image["file_name"]
    if "coco_url" in image:
        return image["coco_url"].rsplit("/", 1)[-1]
    raise ValueError(f"image {image.get('id')!r} has neither 'file_name' nor 'coco_url'")


def _is_records(data: Any) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and "annotation" in data[0]
        and ("conversations" in data[0] or "description" in data[0])
    )


def _records(data: list) -> Iterator[Any]:
    from osprey.data.records import parse_record

    for i, obj in enumerate(data):
        yield parse_record(obj, i)


def _seg(region: Any) -> Any:
    """A Region's segmentation as plain JSON (RLE models dumped)."""
    seg = region.segmentation
    return seg.model_dump() if hasattr(seg, "model_dump") else seg


def _single_region_question(text: str) -> tuple[int, str] | None:
    """(region index 0-based, question with that region written `<region>`) if `text` names exactly one
    region; the `<image>` line and a leading region listing are dropped."""
    refs = {int(k) for k in _REGION_TAG.findall(text)}
    if len(refs) != 1:
        return None
    (k,) = refs
    body = text.replace("<image>\n", "").replace("<image>", "").strip()
    return k - 1, _REGION_TAG.sub("<region>", body)


# ---------------------------------------------------------------------------------------- classification


def _category_label(region: Any) -> str:
    """A region's category; parts are named PACO-style `object:part` when the region names its `parent`."""
    parent = (region.model_extra or {}).get("parent")
    return f"{parent}:{region.category_name}" if parent else region.category_name


_CATEGORY_QUESTION = re.compile(r"\bcategory\b|\bwhat is\b.*\?", re.IGNORECASE)


def load_classification(path: str | Path, image_root: str | Path | None) -> list[RegionItem]:
    data = load_json_or_jsonl(path)
    items: list[RegionItem] = []
    if isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data):
        images = {im["id"]: im for im in data["images"]}
        names = {c["id"]: c["name"] for c in data["categories"]}
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            items.append(
                RegionItem(
                    f"{ann['image_id']}:{ann.get('id', len(items))}",
                    resolve_image(image_root, _file_name(im)),
                    im["height"],
                    im["width"],
                    ann["segmentation"],
                    names[ann["category_id"]],
                )
            )
    elif isinstance(data, list) and data and "categories" in data[0]:  # official lvis/paco eval list
        for r, rec in enumerate(data):
            if len(rec["categories"]) != len(rec["annotations"]):
                raise ValueError(
                    f"{path}: entry {r} has {len(rec['categories'])} categories but "
                    f"{len(rec['annotations'])} annotations"
                )
            for i, (name, ann) in enumerate(zip(rec["categories"], rec["annotations"])):
                items.append(
                    RegionItem(
                        f"{r}:{i}",
                        resolve_image(image_root, rec["file_name"]),
                        rec["height"],
                        rec["width"],
                        ann["segmentation"],
                        name,
                    )
                )
    elif _is_records(data):
        for r, rec in enumerate(_records(data)):
            image = resolve_image(image_root, rec.file_name)
            named = [(i, _category_label(reg)) for i, reg in enumerate(rec.annotation) if reg.category_name]
            if named:
                for i, name in named:
                    items.append(
                        RegionItem(f"{r}:{i}", image, rec.height, rec.width, _seg(rec.annotation[i]), name)
                    )
                continue
            turns = rec.conversations or []
            for t in range(0, len(turns) - 1, 2):
                q = _single_region_question(turns[t].value)
                if q is None or not _CATEGORY_QUESTION.search(turns[t].value):
                    continue
                label = turns[t + 1].value.strip().rstrip(".")
                i = q[0]
                items.append(
                    RegionItem(f"{r}:{t}", image, rec.height, rec.width, _seg(rec.annotation[i]), label)
                )
    else:
        raise ValueError(
            f"{path}: not a classification set (expected an LVIS/PACO eval list, a COCO-style json "
            "or Osprey-format records with category names)"
        )
    if not items:
        raise ValueError(f"{path}: no labelled regions found")
    return items


# ---------------------------------------------------------------------------------------- captions


def load_captions(path: str | Path, image_root: str | Path | None) -> list[RegionItem]:
    data = load_json_or_jsonl(path)
    items: list[RegionItem] = []
    if isinstance(data, dict) and {"images", "annotations"} <= set(data):
        images = {im["id"]: im for im in data["images"]}
        for n, ann in enumerate(data["annotations"]):
            im = images[ann["image_id"]]
            refs = ann.get("captions") or ([ann["caption"]] if "caption" in ann else None)
            if refs is None:  # official RefCOCOg: the image entry is the referring sample
                refs = im.get("captions") or ([im["caption"]] if "caption" in im else None)
            if not refs:
                raise ValueError(f"{path}: annotation {ann.get('id', n)} has no caption (nor does its image)")
            items.append(
                RegionItem(
                    str(ann.get("id", n)),
                    resolve_image(image_root, _file_name(im)),
                    im["height"],
                    im["width"],
                    ann["segmentation"],
                    [str(c) for c in refs],
                )
            )
    elif _is_records(data):
        from osprey.data.records import DESCRIPTION_ENTRY

        for r, rec in enumerate(_records(data)):
            image = resolve_image(image_root, rec.file_name)
            refs: dict[int, list[str]] = {}
            for entry in rec.description or []:
                m = DESCRIPTION_ENTRY.match(entry)
                if m:
                    refs.setdefault(int(m.group(1)) - 1, []).append(m.group(2).strip())
            for i, reg in enumerate(rec.annotation):
                caps = refs.get(i) or (
                    [reg.caption] if isinstance(getattr(reg, "caption", None), str) else None
                )
                if caps:
                    items.append(RegionItem(f"{r}:{i}", image, rec.height, rec.width, _seg(reg), caps))
    else:
        raise ValueError(
            f"{path}: not a caption set (expected a COCO-style json with captions or Osprey-format "
            "records with descriptions)"
        )
    if not items:
        raise ValueError(f"{path}: no captioned regions found")
    return items


# ---------------------------------------------------------------------------------------- descriptions


def load_descriptions(
    path: str | Path,
    image_root: str | Path | None,
    references: str | Path | None = None,
    context: str | Path | None = None,
) -> list[RegionItem]:
    """Items with `question` (region written `<region>`), `target` = reference answer, extra["context"]."""
    data = load_json_or_jsonl(path)
    if not _is_records(data):
        return _official_descriptions(data, path, image_root, references, context)
    items: list[RegionItem] = []
    for r, rec in enumerate(_records(data)):
        image = resolve_image(image_root, rec.file_name)
        if rec.description:
            items += _record_descriptions(rec, r, image)
        else:  # single-region questions of a conversation, their answers the references
            items += [RegionItem(key, image, rec.height, rec.width, segmentation, answer.strip(), question=question,
                                 extra={"context": ""})
                      for key, segmentation, question, answer in _region_questions(rec, r)]
    if not items:
        raise ValueError(f"{path}: no single-region questions with reference answers found")
    return items


def _record_descriptions(rec: Any, r: int, image: str) -> list[RegionItem]:
    """A record's `<regionK>: description` entries as detailed-description questions."""
    from osprey.data.records import DESCRIPTION_ENTRY

    context = rec.model_extra.get("context", "") if rec.model_extra else ""
    items = []
    for entry in rec.description:
        m = DESCRIPTION_ENTRY.match(entry)
        if m:
            i = int(m.group(1)) - 1
            items.append(RegionItem(f"{r}:{i}", image, rec.height, rec.width, _seg(rec.annotation[i]),
                                    m.group(2).strip(), question="Can you give me a detailed description of <region>?",
                                    extra={"context": context}))
    return items


def _official_descriptions(data: Any, path: str | Path, image_root: str | Path | None,
                           references: str | Path | None, context: str | Path | None) -> list[RegionItem]:
    """The official Ferret-Bench-style question list, with answers and image contexts from their own files."""
    refs_by_id = {a["question_id"]: a["text"] for a in load_json_or_jsonl(references)} if references else {}
    ctx_by_image = {c["image"]: c["prompt"] for c in load_json_or_jsonl(context)} if context else {}
    items = []
    for n, q in enumerate(data):
        qid = q.get("question_id", n)
        file_name = q.get("image") or q["file_name"]
        ann = q.get("annotation") or {"segmentation": q["segmentation"]}
        if isinstance(ann, list):
            ann = ann[0]
        reference = q.get("reference") or q.get("answer") or refs_by_id.get(qid)
        if reference is None:
            raise ValueError(f"{path}: question {qid} has no reference answer (give --references)")
        image = resolve_image(image_root, file_name)
        h, w = (q["height"], q["width"]) if "height" in q and "width" in q else image_size(image)
        items.append(RegionItem(str(qid), image, h, w, ann["segmentation"], reference,
                                question=q.get("text") or q["question"],
                                extra={"context": q.get("context") or ctx_by_image.get(file_name, ""),
                                       "category": q.get("category", "description")}))
    return items


def _region_questions(rec: Any, r: int) -> Iterator[tuple[str, Any, str, str]]:
    """(key, segmentation, question with `<region>`, answer) for each user turn of a record's conversation that
    asks about exactly one region."""
    turns = rec.conversations or []
    for t in range(0, len(turns) - 1, 2):
        q = _single_region_question(turns[t].value)
        if q is not None:
            yield f"{r}:{t}", _seg(rec.annotation[q[0]]), q[1], turns[t + 1].value


# ---------------------------------------------------------------------------------------- POPE


_YES_NO = re.compile(r"^\s*(yes|no)\b", re.IGNORECASE)


def load_pope(path: str | Path, image_root: str | Path | None) -> list[RegionItem]:
    """Items with `question`, `target` "yes"/"no"; `segmentation` None for image-level (official) POPE."""
    data = load_json_or_jsonl(path)
    items: list[RegionItem] = []
    if _is_records(data):
        for r, rec in enumerate(_records(data)):
            image = resolve_image(image_root, rec.file_name)
            for key, segmentation, question, answer in _region_questions(rec, r):
                m = _YES_NO.match(answer)
                if m is not None:
                    items.append(RegionItem(key, image, rec.height, rec.width, segmentation, m.group(1).lower(),
                                            question=question))
    elif isinstance(data, list) and data and {"image", "text", "label"} <= set(data[0]):
        sizes: dict[str, tuple[int, int]] = {}
        for n, q in enumerate(data):
            image = resolve_image(image_root, q["image"])
            if image not in sizes:
                sizes[image] = image_size(image)
            label = str(q["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{path}: item {n} has label {q['label']!r}, expected yes/no")
            h, w = sizes[image]
            items.append(
                RegionItem(str(q.get("question_id", n)), image, h, w, None, label, question=q["text"])
            )
    else:
        raise ValueError(
            f"{path}: not a POPE set (expected POPE JSON lines with image/text/label, or "
            "Osprey-format records with yes/no answers about one region)"
        )
    if not items:
        raise ValueError(f"{path}: no yes/no questions found")
    return items


# ---------------------------------------------------------------------------------------- panoptic


@dataclass(frozen=True)
class PanopticImage:
    image_id: Any
    image: str
    png: str
    segments: list[dict]  # COCO panoptic segments_info: id, category_id, iscrowd, ...


def load_panoptic(
    path: str | Path, image_root: str | Path | None, png_root: str | Path | None
) -> list[PanopticImage]:
    data = load_json_or_jsonl(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(
            f"{path}: not a COCO-panoptic json (needs 'images' and 'annotations' with segments_info)"
        )
    images = {im["id"]: im for im in data["images"]}
    png_root = Path(png_root) if png_root else Path(path).with_suffix("")
    out = []
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        out.append(
            PanopticImage(
                ann["image_id"],
                resolve_image(image_root, _file_name(im)),
                str(png_root / ann["file_name"]),
                list(ann["segments_info"]),
            )
        )
    return out


def read_panoptic_png(path: str) -> np.ndarray:
    """(H, W) int64 segment ids from a COCO-panoptic PNG (id = R + 256 G + 256^2 B)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
