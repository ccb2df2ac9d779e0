"""What every evaluation command shares: backend options, the resumable answering loop and the outputs."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.backends import Query, Sampling, make_backend
from eval.runner import PartialResults, answer_all, partial_path, write_json_atomic

logger = logging.getLogger(__name__)


def add_common_arguments(p: argparse.ArgumentParser, default_task: str | None = None) -> None:
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="model folder, run in-process with osprey.inference.OspreyPipeline")
    src.add_argument("--endpoint", help="URL of a running `osprey serve` (POST /v1/regions/describe)")
    src.add_argument("--api-key", default=None, help="bearer token for --endpoint")
    src.add_argument("--served-model", default=None, help="model name to request from --endpoint")
    src.add_argument(
        "--device", default="auto", help="in-process device: auto (cuda if available), cpu, cuda:0 ..."
    )
    src.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="in-process weights dtype (auto: as saved)",
    )
    gen = p.add_argument_group("decoding")
    gen.add_argument(
        "--batch-size", type=int, default=8, help="regions answered together (always of one image)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=1024, help="official: 1024")
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (default, deterministic); the official evals sample at 0.2 (add --seed)",
    )
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    if default_task is not None:
        gen.add_argument(
            "--task",
            default=default_task,
            help=f"prompt: a task name of osprey.prompts.TASK_PROMPTS or a custom prompt with <region> "
            f"(default {default_task!r})",
        )
    io = p.add_argument_group("data and outputs")
    io.add_argument("--images", default=None, help="image folder the annotation file names are relative to")
    io.add_argument(
        "--out",
        required=True,
        help="results JSON; the report goes next to it as .md (+ .png plots); "
        "partial answers in <out>.partial.jsonl make a rerun resume",
    )
    io.add_argument("--report", default=None, help="report path (default: --out with .md)")
    io.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")


def sampling_from(args: argparse.Namespace) -> Sampling:
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def limit(items: Sequence[Any], n: int | None) -> list[Any]:
    if n is not None and n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    return list(items[:n] if n is not None else items)


def report_path(args: argparse.Namespace) -> Path:
    return Path(args.report) if args.report else Path(args.out).with_suffix(".md")


def run_meta(args: argparse.Namespace, command: str, extra_meta: dict | None = None) -> dict:
    """What identifies a run's answers: a partial file written under other settings is not resumed."""
    if args.endpoint:
        source = {"endpoint": args.endpoint, "served_model": args.served_model}
    else:
        source = {"model": str(Path(args.model).resolve()) if args.model else None, "dtype": args.dtype}
    return {
        "command": command,
        "data": str(Path(args.data).resolve()),
        **source,
        "sampling": vars(sampling_from(args)),
        **(extra_meta or {}),
    }


def answer_queries(
    args: argparse.Namespace, command: str, queries: Sequence[Query], extra_meta: dict | None = None
) -> tuple[dict[str, dict], dict]:
    """Ask the model every query (resuming from `<out>.partial.jsonl`); returns answers by key and run info."""
    sampling = sampling_from(args)
    meta = run_meta(args, command, extra_meta)
    backend = make_backend(args)  # before the partial file: a run that cannot start leaves nothing behind
    partial = PartialResults(partial_path(args.out), meta)
    start = time.perf_counter()
    answers = answer_all(
        backend, queries, sampling, partial, batch_size=args.batch_size, desc=f"eval {command}"
    )
    run = {
        **meta,
        "backend": backend.name,
        "items": len(queries),
        "answer_seconds": round(time.perf_counter() - start, 3),
    }
    return answers, run


def finish(args: argparse.Namespace, results: dict) -> None:
    """Write the results JSON atomically and drop the partial file (its answers are in the results)."""
    write_json_atomic(args.out, results)
    partial_path(args.out).unlink(missing_ok=True)
    logger.info("wrote %s", args.out)
