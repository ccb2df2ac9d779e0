"""`osprey annotate` data: datasets read into typed image/region items, the resumable JSON-lines output, COCO write-back.

Three input layouts (docs/annotate.md):
- COCO instances JSON + `--images DIR`: regions are the annotations (polygons, RLE, or the bbox when an
  annotation has no segmentation), ids are the annotation ids; COCO panoptic JSON + `--images DIR`: regions are the
  `segments_info` entries, ids the segment ids, masks read from the PNG folder named like the JSON (`--panoptic-masks`);
- SAM folder: `DIR/NAME.jpg` + `DIR/NAME.json` (the automatic mask generator's list, or `{"annotations": [...]}`),
  ids are list indices;
- PNG folder: `DIR/NAME.jpg` + `DIR/NAME/*.png`, one mask per PNG (the layout SAM's `amg.py` writes without
  `--convert-to-rle`), ids are the PNG file stems.
Masks are not decoded here: workers decode them with `osprey.masks`, so a bad mask fails its own region only.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class InputError(ValueError):
    """A missing or unreadable INPUT (the command exits 2); per-region problems are failures, not this."""


@dataclass(frozen=True)
class RegionItem:
    id: int | str  # COCO annotation id, SAM list index, or PNG file stem
    segmentation: Any = None  # any `osprey.masks.decode_mask` form (COCO polygons / RLE / box / SAM entry)
    mask_file: str | None = None  # a PNG mask file instead of `segmentation` (a panoptic PNG with `segment_id`)
    segment_id: int | None = None  # COCO panoptic: the region is `mask_file`'s pixels with this id


@dataclass(frozen=True)
class ImageItem:
    image: str  # the image's name as the dataset gives it (COCO file_name), written to every record
    path: str  # where to read it
    image_id: int | str
    regions: tuple[RegionItem, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ImageItem:
        raw = json.loads(text)
        return cls(raw["image"], raw["path"], raw["image_id"], tuple(RegionItem(**r) for r in raw["regions"]))


@dataclass
class RegionRecord:
    """One output line: a region and the model's answer about it."""

    image: str
    image_id: int | str
    id: int | str
    rle: dict[str, Any]  # compressed COCO RLE (counts as text)
    box: list[float]  # COCO [x, y, w, h] of the mask's pixels
    area: int
    text: str  # cleaned answer (osprey.prompts.clean_answer)
    raw_text: str
    finish_reason: str
    model: str
    prompt: str  # the user message sent with the region


@dataclass
class Failure:
    image: str
    id: int | str | None  # None: the whole image failed
    reason: str


@dataclass
class ImageResult:
    records: list[RegionRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def record_key(image: str, region_id: int | str) -> str:
    return json.dumps([image, region_id])


# ---------------------------------------------------------------------------------------------- readers


def read_input(source: str, images: str | None = None, layout: str = "auto",
               panoptic_masks: str | None = None) -> list[ImageItem]:
    """INPUT -> image items, in dataset order. Raises InputError naming the path when INPUT is unusable."""
    path = Path(source)
    if not path.exists():
        raise InputError(f"INPUT {source} does not exist")
    if layout == "auto":
        layout = "coco" if path.is_file() else ("sam" if any(path.glob("*.json")) else "png")
    if layout == "coco":
        if images is None:
            raise InputError("a COCO INPUT needs --images DIR (the folder its file_name entries are in)")
        return read_coco(path, Path(images), panoptic_masks)
    if not path.is_dir():
        raise InputError(f"INPUT {source} must be a folder for the {layout} layout")
    return read_sam_folder(path) if layout == "sam" else read_png_folder(path)


def read_coco(path: Path, images: Path, panoptic_masks: str | None = None) -> list[ImageItem]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"INPUT {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise InputError(f"INPUT {path} is not a COCO file: expected 'images' and 'annotations'")
    if data["annotations"] and "segments_info" in data["annotations"][0]:
        return read_panoptic(data, images, Path(panoptic_masks) if panoptic_masks else path.with_suffix(""))
    by_image: dict[Any, list[RegionItem]] = {}
    for ann in data["annotations"]:
        seg = ann.get("segmentation") or ({"box": ann["bbox"]} if "bbox" in ann else None)
        by_image.setdefault(ann.get("image_id"), []).append(RegionItem(ann["id"], seg))
    return [ImageItem(img["file_name"], str(images / img["file_name"]), img["id"], tuple(by_image.get(img["id"], ())))
            for img in data["images"] if by_image.get(img["id"])]


def read_panoptic(data: dict, images: Path, masks: Path) -> list[ImageItem]:
    if not masks.is_dir():
        raise InputError(f"COCO panoptic INPUT: its PNG folder {masks} does not exist (pass --panoptic-masks DIR)")
    names = {img["id"]: img["file_name"] for img in data["images"]}
    items = []
    for ann in data["annotations"]:
        name = names.get(ann["image_id"], f"{ann['image_id']}")
        png = str(masks / ann["file_name"])
        regions = tuple(RegionItem(seg["id"], mask_file=png, segment_id=seg["id"]) for seg in ann["segments_info"])
        if regions:
            items.append(ImageItem(name, str(images / name), ann["image_id"], regions))
    return items


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_sam_folder(folder: Path) -> list[ImageItem]:
    items = []
    for image in _images_in(folder):
        sidecar = image.with_suffix(".json")
        if not sidecar.is_file():
            continue
        try:
            entries = json.loads(sidecar.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"SAM file {sidecar} is not readable JSON: {exc}") from None
        if isinstance(entries, dict):
            entries = entries.get("annotations", [])
        if not isinstance(entries, list):
            raise InputError(f"SAM file {sidecar}: expected a list of mask entries, got {type(entries).__name__}")
        regions = tuple(RegionItem(i, entry) for i, entry in enumerate(entries))
        if regions:
            items.append(ImageItem(image.name, str(image), image.stem, regions))
    if not items:
        raise InputError(f"no image in {folder} has a NAME.json SAM file next to it")
    return items


def read_png_folder(folder: Path) -> list[ImageItem]:
    items = []
    for image in _images_in(folder):
        masks = sorted((folder / image.stem).glob("*.png")) if (folder / image.stem).is_dir() else []
        regions = tuple(RegionItem(m.stem, mask_file=str(m)) for m in masks)
        if regions:
            items.append(ImageItem(image.name, str(image), image.stem, regions))
    if not items:
        raise InputError(f"no image in {folder} has a NAME/ folder of PNG masks next to it")
    return items


# ---------------------------------------------------------------------------------------------- output


class JsonlOutput:
    """The OUT file: resumable, appended per batch with flush + fsync of complete lines only.

    A run killed mid-write can leave a torn last line; opening drops it (truncates to the last newline), so its
    region is redone and no line is half a record. Complete lines are kept: their regions are skipped.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.dropped_torn_line = False
        if self.path.exists():
            self._load()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line from a kill mid-write
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            self.dropped_torn_line = True
        for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                self.done.add(record_key(row["image"], row["id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{self.path}:{number} is not an annotate record ({exc}); "
                                 "move the file away or pass another --out") from None

    def append(self, records: Iterable[RegionRecord]) -> None:
        lines = [json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records]
        if not lines:
            return
        self._file.write("".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(record_key(r.image, r.id) for r in records)

    def close(self) -> None:
        self._file.close()


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write a whole file through a temporary file and a rename, so readers never see half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def answer_key(task: str) -> str:
    """The key under an annotation's "osprey" object: caption for short/detailed, category, or answer."""
    return {"short": "caption", "detailed": "caption", "category": "category"}.get(task, "answer")


def write_coco(source: str | Path, out_jsonl: str | Path, target: str | Path, task: str) -> int:
    """The COCO INPUT with each answered annotation (panoptic: segment) given `"osprey": {KEY: text, ...}`;
    returns how many annotations got one."""
    data = json.loads(Path(source).read_text())
    answers = {record_key(r["image"], r["id"]): r for r in read_records(out_jsonl)}
    names = {img["id"]: img["file_name"] for img in data["images"]}
    count = 0
    for ann in data["annotations"]:
        image = names.get(ann.get("image_id"), "")
        for region in ann.get("segments_info", [ann]):  # panoptic: the answers go on the segments
            row = answers.get(record_key(image, region["id"]))
            if row is not None:
                region["osprey"] = {answer_key(task): row["text"], "model": row["model"],
                                    "finish_reason": row["finish_reason"]}
                count += 1
    write_text_atomic(json.dumps(data, ensure_ascii=False), target)
    return count
