"""Running queries resumably: per-item answers are appended to `<out>.partial.jsonl` as they come, a restart
skips the items already answered, and final files are written atomically (temp file + os.replace).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.backends import Answer, Backend, Query, Sampling

logger = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """NaN / inf (undefined metrics) become null: strict JSON readers reject NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (undefined metrics written as null), atomically."""
    write_atomic(path, json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def partial_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".partial.jsonl")


class PartialResults:
    """`<out>.partial.jsonl`: a first line `{"meta": ...}` then one JSON object per answered item.

    Resuming with a different meta (other task, model or sampling) is refused: mixing answers would make
    the score meaningless.
    """

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta))  # normalise (tuples -> lists) for comparison
        self.done: dict[str, dict] = {}
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"meta": self.meta}) + "\n")

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines:
            raise ValueError(f"{self.path} is empty; delete it to start over")
        stored = json.loads(lines[0]).get("meta")
        if stored != self.meta:
            diff = sorted(
                k for k in set(stored or {}) | set(self.meta) if (stored or {}).get(k) != self.meta.get(k)
            )
            raise ValueError(
                f"{self.path} was written by a run with other settings (differing: {diff}); "
                "delete it or use another --out to start over"
            )
        for n, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: only the last one can be
                if n == len(lines):
                    logger.warning("dropping a truncated last line of %s", self.path)
                    break
                raise ValueError(f"{self.path}:{n} is not valid JSON")
            self.done[rec["key"]] = rec
        logger.info("resuming: %d items already answered in %s", len(self.done), self.path)

    def append(self, records: Iterable[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.done[rec["key"]] = rec
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def chunk_by_image(queries: Sequence[Query], batch_size: int) -> list[list[Query]]:
    """Consecutive chunks of at most `batch_size` queries on one image; images keep first-seen order."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    by_image: dict[str, list[Query]] = {}
    for q in queries:
        by_image.setdefault(q.image, []).append(q)
    return [
        group[i : i + batch_size] for group in by_image.values() for i in range(0, len(group), batch_size)
    ]


def answer_all(
    backend: Backend,
    queries: Sequence[Query],
    sampling: Sampling,
    partial: PartialResults,
    batch_size: int = 8,
    desc: str = "answering",
) -> dict[str, dict]:
    """Answer every query not yet in `partial`; returns key -> {"key", "text", "raw_text", ...} for all."""
    keys = [q.key for q in queries]
    if len(set(keys)) != len(keys):
        raise ValueError("query keys must be unique")
    todo = [q for q in queries if q.key not in partial.done]
    with tqdm(total=len(queries), initial=len(queries) - len(todo), desc=desc, unit="region") as bar:
        for chunk in chunk_by_image(todo, batch_size):
            answers: list[Answer] = backend.answer(chunk, sampling)
            partial.append(
                {
                    "key": q.key,
                    "text": a.text,
                    "raw_text": a.raw_text,
                    "completion_tokens": a.completion_tokens,
                    "finish_reason": a.finish_reason,
                }
                for q, a in zip(chunk, answers)
            )
            bar.update(len(chunk))
    return {k: partial.done[k] for k in keys}
