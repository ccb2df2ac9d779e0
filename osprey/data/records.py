"""Osprey-724K instruction records (spec section 9): typed models, a streaming reader, an atomic writer.

A record is one image with its regions (`annotation`) and either a conversation about them or a list of
per-region descriptions; regions are referred to in text as `<region1>`, `<region2>`, ... in annotation
order. Fields we do not model (official files carry a few) are kept and written back unchanged.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from osprey.masks import decode_mask, to_rle

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DESCRIPTION_ENTRY",
    "REGION_REF",
    "RLE",
    "Record",
    "RecordError",
    "RecordWriter",
    "Region",
    "Turn",
    "decode_region_mask",
    "iter_json_items",
    "iter_records",
    "parse_record",
    "read_records",
    "record_masks",
    "record_problems",
    "region_refs",
    "region_rle",
    "write_records",
]

REGION_REF = re.compile(r"<region(\d+)>")
DESCRIPTION_ENTRY = re.compile(r"^<region(\d+)>:\s*(\S.*)$", re.DOTALL)  # "<regionK>: text"


class RecordError(ValueError):
    """A record that does not parse; `index` is its position in the file (None when unknown)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message if index is None else f"record {index}: {message}")
        self.index = index


class RLE(BaseModel):
    """COCO run-length encoding: compressed (`counts` str) or uncompressed (`counts` list of ints)."""

    model_config = ConfigDict(extra="forbid")

    size: tuple[PositiveInt, PositiveInt]  # [height, width]
    counts: str | list[StrictInt]  # strict: "5" or 5.0 in counts is a data error, not something to coerce

    @field_validator("counts", mode="before")
    @classmethod
    def _bytes_to_str(cls, value: Any) -> Any:
        return value.decode("ascii") if isinstance(value, (bytes, bytearray)) else value


class Region(BaseModel):
    """One annotated region; `segmentation` is COCO polygons (list of flat xy lists) or RLE."""

    model_config = ConfigDict(extra="allow")

    segmentation: list[list[StrictFloat]] | RLE  # strict: ints pass, strings and bools do not
    bbox: list[StrictFloat] = Field(min_length=4, max_length=4)  # COCO [x, y, w, h]
    category_id: int | None = None
    category_name: str | None = None


class Turn(BaseModel):
    """One conversation message; `speaker` is the JSON key "from"."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Record(BaseModel):
    """One image with its regions and either `conversations` or `description` (exactly one of them)."""

    model_config = ConfigDict(extra="allow")

    id: int | str  # COCO image id in the official files
    file_name: str = Field(min_length=1)
    height: PositiveInt
    width: PositiveInt
    annotation: list[Region]
    conversations: list[Turn] | None = None
    description: list[str] | None = None

    @model_validator(mode="after")
    def _one_text_kind(self) -> Record:
        if (self.conversations is None) == (self.description is None):
            raise ValueError("a record needs exactly one of 'conversations' or 'description'")
        return self

    def texts(self) -> list[str]:
        """Every text of the record (turn values or description entries), in order."""
        if self.conversations is not None:
            return [turn.value for turn in self.conversations]
        return list(self.description or [])

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict with the official keys ("from"), extras kept, unset optionals omitted."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


# ---------------------------------------------------------------------------------------------- checks


def region_refs(text: str) -> list[int]:
    """Region numbers mentioned as `<regionK>` in `text`, in order of appearance (1-based, repeats kept)."""
    return [int(m) for m in REGION_REF.findall(text)]


def record_problems(record: Record) -> list[tuple[str, str]]:
    """Text-level problems of a parsed record as `(kind, message)` pairs (masks are not decoded here).

    Kinds: no-regions, region-ref, empty-conversation, roles, last-turn, empty-text, description-format.
    """
    problems: list[tuple[str, str]] = []
    n = len(record.annotation)
    if n == 0:
        problems.append(("no-regions", "annotation is empty"))
    for i, text in enumerate(record.texts()):
        bad = sorted({k for k in region_refs(text) if not 1 <= k <= n})
        if bad:
            where = f"conversations[{i}]" if record.conversations is not None else f"description[{i}]"
            message = (f"{where} refers to <region{bad[0]}> but the record has {n} region(s) "
                       f"(valid: 1..{n}); out of range: {bad}")
            problems.append(("region-ref", message))
    if record.conversations is not None:
        turns = record.conversations
        if not turns:
            problems.append(("empty-conversation", "conversations is empty"))
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if turn.speaker != expected:
                message = (f"conversations[{i}] is from {turn.speaker!r}, expected {expected!r} "
                           "(roles alternate starting with human)")
                problems.append(("roles", message))
                break
        if turns and turns[-1].speaker != "gpt":
            problems.append(("last-turn", f"conversation ends with a {turns[-1].speaker!r} turn, not 'gpt'"))
        for i, turn in enumerate(turns):
            if not turn.value.strip():
                problems.append(("empty-text", f"conversations[{i}] ({turn.speaker}) has an empty value"))
    else:
        entries = record.description or []
        if not entries:
            problems.append(("description-format", "description is empty"))
        for i, entry in enumerate(entries):
            if not DESCRIPTION_ENTRY.match(entry):
                problems.append(("description-format",
                                 f"description[{i}] is not '<regionK>: text': {entry[:60]!r}"))
    return problems


def parse_record(obj: Any, index: int | None = None) -> Record:
    """Validate one JSON object as a Record; RecordError (with `index`) names the failing fields."""
    if isinstance(obj, Record):
        return obj
    if not isinstance(obj, Mapping):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}", index)
    try:
        return Record.model_validate(obj)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<record>'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise RecordError(f"schema: {details}", index) from None


# ---------------------------------------------------------------------------------------------- masks


def decode_region_mask(region: Region | Mapping[str, Any], height: int, width: int, *,
                       strict: bool = False) -> np.ndarray:
    """A region's segmentation -> `(height, width) bool` (raises osprey.masks.MaskError if undecodable)."""
    return decode_mask(_segmentation(region), height, width, strict=strict)


def region_rle(region: Region | Mapping[str, Any], height: int, width: int, *,
               strict: bool = False) -> dict[str, Any]:
    """A region's segmentation -> compressed RLE `{"size", "counts": str}`, checked like
    `decode_region_mask` but without materialising the mask (validation of big files)."""
    return to_rle(_segmentation(region), height, width, strict=strict)


def _segmentation(region: Region | Mapping[str, Any]) -> Any:
    if isinstance(region, Region):
        seg = region.segmentation
        return seg.model_dump() if isinstance(seg, RLE) else seg
    if "segmentation" not in region:
        raise ValueError(f"region has no 'segmentation'; keys: {sorted(region)}")
    return region["segmentation"]


def record_masks(record: Record, *, strict: bool = False) -> np.ndarray:
    """All region masks of a record: `(N, height, width) bool`, in annotation order."""
    masks = [decode_region_mask(r, record.height, record.width, strict=strict) for r in record.annotation]
    if not masks:
        return np.zeros((0, record.height, record.width), dtype=bool)
    return np.stack(masks)


# ---------------------------------------------------------------------------------------------- reading

_CHUNK = 1 << 20  # characters read per refill; records are KBs, files 100+ MB
_WS = " \t\n\r"
_NUMBER_CHARS = frozenset("0123456789.eE+-")


def iter_json_items(path: str | os.PathLike[str], *, chunk_size: int = _CHUNK) -> Iterator[tuple[int, Any]]:
    """Yield `(index, item)` for each element of a top-level JSON list, or each value of a JSON-lines file,
    without loading the file: a buffered `json.JSONDecoder.raw_decode` loop. Memory ~ chunk + one item.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        reader = _Buffer(f, chunk_size)
        first = reader.peek_non_ws()
        if first is None:
            raise RecordError(f"{path}: file is empty (expected a JSON list)")
        is_list = first == "["
        if is_list:
            reader.pos += 1
        index = 0
        while True:
            c = reader.peek_non_ws()
            if c is None:
                if is_list:
                    raise RecordError(f"{path}: unexpected end of file inside the top-level list", index)
                return
            if is_list and c == "]":
                reader.pos += 1
                if reader.peek_non_ws() is not None:
                    raise RecordError(f"{path}: data after the closing ']' at character {reader.offset()}")
                return
            yield index, reader.decode(decoder, path, index)
            index += 1
            if is_list:
                c = reader.peek_non_ws()
                if c is None:
                    raise RecordError(f"{path}: unexpected end of file inside the top-level list", index)
                if c == ",":
                    reader.pos += 1
                    if reader.peek_non_ws() == "]":
                        raise RecordError(f"{path}: trailing comma before ']' at character {reader.offset()}")
                elif c != "]":
                    raise RecordError(f"{path}: expected ',' or ']' after item {index - 1} at character "
                                      f"{reader.offset()}, found {c!r}", index - 1)


class _Buffer:
    """A text buffer over a file that refills on demand and drops what was consumed."""

    def __init__(self, f: TextIO, chunk_size: int):
        self.f, self.chunk_size = f, chunk_size
        self.buf, self.pos, self.dropped, self.eof = "", 0, 0, False

    def offset(self) -> int:
        return self.dropped + self.pos

    def _refill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk_size)
        if not data:
            self.eof = True
            return False
        self.dropped += self.pos
        self.buf, self.pos = self.buf[self.pos:] + data, 0
        return True

    def peek_non_ws(self) -> str | None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._refill():
                return None

    def decode(self, decoder: json.JSONDecoder, path: Any, index: int) -> Any:
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.buf) - 32 or exc.msg.startswith("Unterminated string")
                if cut and self._refill():
                    continue  # the item is cut by the buffer end: read more and retry
                raise RecordError(f"{path}: invalid JSON at character {self.dropped + exc.pos}: {exc.msg}",
                                  index) from None
            if not isinstance(value, (dict, list, str)):
                tail = end
                while tail < len(self.buf) and self.buf[tail] in _NUMBER_CHARS:
                    tail += 1
                if tail == len(self.buf) and self._refill():
                    continue  # a number cut by the buffer end ("3." of "3.5e-7"): read more and retry
            self.pos = end
            return value


def iter_records(path: str | os.PathLike[str], *, chunk_size: int = _CHUNK) -> Iterator[tuple[int, Record]]:
    """Yield `(index, Record)` streaming; the first record that fails the schema raises RecordError."""
    for index, obj in iter_json_items(path, chunk_size=chunk_size):
        yield index, parse_record(obj, index)


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """All records of a file (small files; use `iter_records` for big ones)."""
    return [record for _, record in iter_records(path)]


# ---------------------------------------------------------------------------------------------- writing


class RecordWriter:
    """Streams records to a JSON list (or JSON lines for `*.jsonl`), one record per line, atomically:
    everything goes to a temp file next to `path`, renamed over it only when the `with` block succeeds.

        with RecordWriter("out.json") as w:
            w.write(record)
    """

    def __init__(self, path: str | os.PathLike[str], *, jsonl: bool | None = None):
        self.path = Path(path)
        self.jsonl = self.path.suffix == ".jsonl" if jsonl is None else jsonl
        self.count = 0
        self._file: TextIO | None = None
        self._tmp: str | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        if not self.jsonl:
            self._file.write("[")
        return self

    def write(self, record: Record | Mapping[str, Any]) -> None:
        """Append one record (a Record, or a dict that must parse as one)."""
        if self._file is None:
            raise RuntimeError("RecordWriter.write called outside its `with` block")
        obj = parse_record(record, self.count).to_json() if not isinstance(record, Record) else record.to_json()
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        if self.jsonl:
            self._file.write(line + "\n")
        else:
            self._file.write(("\n" if self.count == 0 else ",\n") + line)
        self.count += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        assert self._file is not None and self._tmp is not None
        try:
            if exc_type is None:
                if not self.jsonl:
                    self._file.write("\n]\n" if self.count else "]\n")
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._file = None


def write_records(path: str | os.PathLike[str], records: Iterable[Record | Mapping[str, Any]]) -> int:
    """Write `records` atomically (see RecordWriter); returns how many were written."""
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return writer.count
