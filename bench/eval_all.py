"""Run every applicable `osprey eval` command on a generated dataset's split for one model; one summary table.

    python -m bench.eval_all --data data/synth --model runs/tiny --out runs/eval_tiny [--limit 50]
    python -m bench.eval_all --data data/synth --endpoint http://localhost:8000 --out runs/eval_served

Inputs are the files of `osprey data synth` (DIR/<split>/<sub-set>.json, images under DIR):
classify on `stage2_categories` and `stage2_parts` (PACO-style `object:part` labels), caption on
`stage2_referring` (needs Java), pope on `stage3_pos_neg`, describe on `stage3_detailed` (only with
`--judge-url`), and ovseg on `stage2_categories` (`osprey eval ovseg` builds its panoptic ground truth).
The model runs in-process (`--model DIR`) or behind a server (`--endpoint URL`). Each command runs as its own
`osprey eval` process (bench does not import eval); results, reports and `summary.{md,json}` go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, command, sub-set file, metrics shown in the summary)
PLAN = [
    (
        "classify_categories",
        "classify",
        "stage2_categories",
        ["semantic_similarity", "semantic_iou", "accuracy"],
    ),
    ("classify_parts", "classify", "stage2_parts", ["semantic_similarity", "semantic_iou", "accuracy"]),
    ("ovseg", "ovseg", "stage2_categories", ["PQ", "AP", "mIoU", "region_accuracy"]),
    ("caption", "caption", "stage2_referring", ["METEOR", "CIDEr", "BLEU-4", "ROUGE-L"]),
    ("pope", "pope", "stage3_pos_neg", ["accuracy", "f1", "yes_ratio"]),
    ("describe", "describe", "stage3_detailed", ["relative_score", "errors"]),
]
def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _command(
    name: str, cmd: str, data_file: Path, args: argparse.Namespace, out_dir: Path
) -> list[str] | str:
    """The `osprey eval` argv for one plan entry, or the reason it does not apply."""
    argv = [
        sys.executable,
        "-m",
        "osprey.cli",
        "eval",
        cmd,
        "--data",
        str(data_file),
        "--images",
        str(args.data),
        *(["--model", str(args.model)] if args.model else ["--endpoint", args.endpoint]),
        *(["--api-key", args.api_key] if args.api_key else []),
        "--out",
        str(out_dir / f"{name}.json"),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.temperature:
        argv += ["--temperature", str(args.temperature)] + (
            ["--seed", str(args.seed)] if args.seed is not None else []
        )
    if cmd == "caption" and shutil.which("java") is None:
        return "no Java runtime (apt-get install default-jre-headless)"
    if cmd == "describe":
        if not args.judge_url:
            return "no --judge-url (an OpenAI-compatible judge) given"
        argv += ["--judge-url", args.judge_url, "--judge-model", args.judge_model]
        if args.judge_api_key:
            argv += ["--judge-api-key", args.judge_api_key]
    return argv


def _training_overlap(model: Path, data: Path, split: str) -> str | None:
    """`osprey.data.provenance.training_overlap` for a model folder (None when its config cannot be read)."""
    from osprey.checkpoint import read_config
    from osprey.data.provenance import training_overlap

    try:
        config = read_config(model)
    except (OSError, ValueError):
        return None
    return training_overlap(config.training_data, data, split)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="root of a generated dataset (osprey data synth --out)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model folder (in-process)")
    source.add_argument("--endpoint", help="URL of a running `osprey serve`")
    p.add_argument("--api-key", default=None, help="bearer token for --endpoint")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="test")
    p.add_argument("--only", nargs="*", default=None, help=f"run only these of {[e[0] for e in PLAN]}")
    p.add_argument("--limit", type=int, default=None, help="items (ovseg: images) per command")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="answer cap (the official 1024 is slow for a random model that never stops)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--judge-url", default=None)
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--judge-api-key", default=None)
    return p.parse_args(argv)


def _run_entry(name: str, cmd: str, subset: str, metrics: list[str], args: argparse.Namespace,
               split_dir: Path) -> tuple[list[str], dict]:
    """One plan entry as its own `osprey eval` process: (its summary-table row, its report entry)."""
    data_file = split_dir / f"{subset}.json"
    if not data_file.exists():
        return [name, "skipped", f"{data_file.name} missing", "", ""], {"status": "skipped",
                                                                        "reason": f"{data_file} missing"}
    command = _command(name, cmd, data_file, args, args.out)
    if isinstance(command, str):
        return [name, "skipped", command, "", ""], {"status": "skipped", "reason": command}
    print(f"== {name}: {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, text=True, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(proc.stderr[-2000:], file=sys.stderr)
        return [name, "failed", tail[0][:200], "", f"{seconds:.1f}"], {
            "status": "failed", "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    summary = json.loads((args.out / f"{name}.json").read_text())["summary"]
    shown = ", ".join(f"{m} {summary[m]:.2f}" if isinstance(summary[m], float) else f"{m} {summary[m]}"
                      for m in metrics)
    items = summary.get("items", summary.get("regions", ""))
    return [name, "ok", shown, str(items), f"{seconds:.1f}"], {
        "status": "ok", "summary": summary, "seconds": round(seconds, 2), "results": f"{name}.json",
        "report": f"{name}.md"}


def _write_summary(args: argparse.Namespace, rows: list[list[str]], report: dict, contamination: str | None) -> None:
    source = args.model or args.endpoint
    lines = [f"# Evaluation summary: `{source}` on `{args.data}` ({args.split})", "",
             "| eval | status | metrics (x100) | items | seconds |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if contamination:
        lines += ["", f"**Warning: not a held-out evaluation.** {contamination}."]
    lines += ["", "Per-command reports: " + ", ".join(f"[{n}]({n}.md)" for n, v in report.items()
                                                      if v["status"] == "ok")]
    write_atomic(args.out / "summary.md", "\n".join(lines) + "\n")
    write_atomic(args.out / "summary.json", json.dumps(
        {"model": str(source), "data": str(args.data), "split": args.split, "training_overlap": contamination,
         "evals": report}, indent=2) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    split_dir = args.data / args.split
    if not split_dir.is_dir():
        raise SystemExit(f"{split_dir} does not exist: is --data the root of an `osprey data synth` output?")
    args.out.mkdir(parents=True, exist_ok=True)
    # a served model's training data is not known here; a model folder's is in its config
    contamination = _training_overlap(args.model, args.data, args.split) if args.model else None
    if contamination:
        print(f"warning: {contamination}", file=sys.stderr, flush=True)
    rows, report = [], {}
    for name, cmd, subset, metrics in PLAN:
        if args.only is None or name in args.only:
            rows_entry, report[name] = _run_entry(name, cmd, subset, metrics, args, split_dir)
            rows.append(rows_entry)
    _write_summary(args, rows, report, contamination)
    return 0 if all(v["status"] != "failed" for v in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
