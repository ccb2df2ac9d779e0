"""Resumable checkpoints of a training run: `<output>/checkpoints/step-NNNNNN/`, written under a temporary name and
renamed once complete (a kill mid-write leaves the previous checkpoint intact), the oldest pruned.

Both training loops use it: `train.recipe` (a DeepSpeed engine, a model folder, the trainer state) and
`train.clip_pretrain` (one torch file); each writes its files into the folder `writing_checkpoint` yields.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from train import deepspeed_utils as dsu

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)))
    return [p for _, p in steps]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


@contextmanager
def writing_checkpoint(output_dir: str | Path, step: int, rank: int, keep: int) -> Iterator[Path]:
    """Yields the temporary folder every rank writes its share into; then rank 0 renames it to `step-NNNNNN` and
    keeps the newest `keep` checkpoints. Every rank must enter (the barriers wait for all)."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dsu.barrier()
    yield tmp
    dsu.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dsu.barrier()
