"""Validation of Osprey-format record files: every record checked, every problem reported with its index.

Checks per record: schema (osprey.data.records.Record); text problems (`record_problems`: region
references in 1..N, roles alternating from human and ending with gpt, description entries
`<regionK>: text`); every region decodes (osprey.masks), is non-empty, and its bbox and polygon
coordinates lie inside the image (1-pixel tolerance, COCO has coordinates just past the border); the
image file exists under the images folder and, with `check_images`, opens with the record's size.
Bad records are reported, never dropped; self-intersecting polygons are counted as warnings (or errors
with `strict_masks`).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from osprey.data.records import (
    RLE,
    Record,
    RecordError,
    Region,
    iter_json_items,
    parse_record,
    record_problems,
    region_rle,
)
from osprey.masks import MaskError, MaskWarning, rle_area

BORDER_TOLERANCE = 1.0  # pixels a bbox / polygon may reach past the image border


@dataclass(frozen=True)
class Issue:
    """One problem: the record's index in the file, its id when known, a kind and a message."""

    index: int | None
    kind: str
    message: str
    record_id: Any = None

    def __str__(self) -> str:
        where = "file" if self.index is None else f"record {self.index}"
        rid = "" if self.record_id is None else f" (id {self.record_id})"
        return f"{where}{rid}: [{self.kind}] {self.message}"


@dataclass
class ValidationReport:
    """Counts over the whole file plus the first `max_errors` issues in detail."""

    path: str
    records: int = 0
    bad_records: int = 0
    regions: int = 0
    error_counts: Counter = field(default_factory=Counter)
    warning_counts: Counter = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)
    max_errors: int | None = 50

    @property
    def ok(self) -> bool:
        return not self.error_counts

    @property
    def num_errors(self) -> int:
        return sum(self.error_counts.values())

    def add(self, issue: Issue) -> None:
        self.error_counts[issue.kind] += 1
        if self.max_errors is None or len(self.issues) < self.max_errors:
            self.issues.append(issue)

    def summary(self) -> str:
        per = self.regions / self.records if self.records else 0.0
        head = (f"{self.path}: {self.records} records, {self.regions} regions ({per:.2f} per record), "
                f"{self.bad_records} bad records, {self.num_errors} errors")
        lines = [head]
        lines += [f"  error {kind}: {n}" for kind, n in sorted(self.error_counts.items())]
        lines += [f"  warning {kind}: {n}" for kind, n in sorted(self.warning_counts.items())]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "ok": self.ok, "records": self.records, "bad_records": self.bad_records,
            "regions": self.regions, "regions_per_record": self.regions / self.records if self.records else 0.0,
            "errors": dict(self.error_counts), "warnings": dict(self.warning_counts),
            "issues": [{"index": i.index, "id": i.record_id, "kind": i.kind, "message": i.message}
                       for i in self.issues],
        }


def validate_file(path: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None, *,
                  check_images: bool = False, strict_masks: bool = False, max_errors: int | None = 50,
                  progress: bool = True) -> ValidationReport:
    """Validate every record of `path` (JSON list or JSON lines, streamed). `images_dir` None skips the
    image checks; `max_errors` bounds the issues kept in detail (all are counted)."""
    report = ValidationReport(path=str(path), max_errors=max_errors)
    items: Iterator[tuple[int, Any]] = iter_json_items(path)
    try:
        for index, obj in tqdm(items, desc="validate", unit="rec", disable=not progress):
            report.records += 1
            issues, warned, n_regions = check_record(obj, index, images_dir, check_images=check_images,
                                                     strict_masks=strict_masks)
            report.regions += n_regions
            report.warning_counts.update(warned)
            if issues:
                report.bad_records += 1
                for issue in issues:
                    report.add(issue)
    except RecordError as exc:  # the file itself is not a readable JSON list: nothing after this point
        report.add(Issue(exc.index, "json", str(exc)))
    return report


def check_record(obj: Any, index: int, images_dir: str | os.PathLike[str] | None = None, *,
                 check_images: bool = False, strict_masks: bool = False) -> tuple[list[Issue], Counter, int]:
    """All issues of one raw record, the warnings it raised (kind -> count) and its number of regions."""
    warned: Counter = Counter()
    record_id = obj.get("id") if isinstance(obj, dict) else None
    try:
        record = parse_record(obj)
    except RecordError as exc:
        return [Issue(index, "schema", str(exc), record_id)], warned, _count_regions(obj)
    issues = [Issue(index, kind, message, record.id) for kind, message in record_problems(record)]
    for k, region in enumerate(record.annotation, start=1):
        for kind, message in _region_problems(region, record, strict_masks, warned):
            issues.append(Issue(index, kind, f"<region{k}>: {message}", record.id))
    if images_dir is not None:
        issues += [Issue(index, kind, message, record.id)
                   for kind, message in _image_problems(record, Path(images_dir), check_images)]
    return issues, warned, len(record.annotation)


def _region_problems(region: Region, record: Record, strict: bool, warned: Counter) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    h, w = record.height, record.width
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MaskWarning)
            rle = region_rle(region, h, w, strict=strict)  # checked like a decode, without the pixels
        for warning in caught:
            if issubclass(warning.category, MaskWarning):
                warned["self-intersecting polygon" if "self-intersecting" in str(warning.message)
                       else "mask warning"] += 1
    except MaskError as exc:
        return [("mask", str(exc))]
    if rle_area(rle) == 0:
        problems.append(("empty-mask", "mask has no pixels inside the image"))
    x, y, bw, bh = region.bbox
    t = BORDER_TOLERANCE
    if bw <= 0 or bh <= 0:
        problems.append(("bbox", f"bbox {region.bbox} has non-positive size"))
    elif x < -t or y < -t or x + bw > w + t or y + bh > h + t:
        problems.append(("outside-image", f"bbox {region.bbox} (xywh) reaches outside the image {w}x{h} (WxH)"))
    if not isinstance(region.segmentation, RLE):
        for i, poly in enumerate(region.segmentation):
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < -t or min(ys) < -t or max(xs) > w + t or max(ys) > h + t:
                problems.append(("outside-image", f"polygon {i} has points outside the image {w}x{h} (WxH)"))
                break
    return problems


def _image_problems(record: Record, images_dir: Path, check_images: bool) -> list[tuple[str, str]]:
    path = images_dir / record.file_name
    if not path.is_file():
        return [("image-missing", f"image file {path} does not exist (file_name is relative to --images)")]
    if not check_images:
        return []
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size = image.size  # header only: no pixel decoding
    except (UnidentifiedImageError, OSError) as exc:
        return [("image-unreadable", f"cannot open {path}: {exc}")]
    if size != (record.width, record.height):
        message = f"{path} is {size[0]}x{size[1]} (WxH) but the record says {record.width}x{record.height}"
        return [("image-size", message)]
    return []


def _count_regions(obj: Any) -> int:
    annotation = obj.get("annotation") if isinstance(obj, dict) else None
    return len(annotation) if isinstance(annotation, list) else 0
