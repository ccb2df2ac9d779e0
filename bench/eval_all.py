"""Run every applicable `osprey eval` command on a generated dataset's split for one model; one summary table.

    python -m bench.eval_all --data data/synth --model runs/tiny --out runs/eval_tiny [--limit 50]

Inputs are the files of `osprey data synth` (DIR/<split>/<sub-set>.json, images under DIR):
classify on `stage2_categories` and `stage2_parts` (PACO-style `object:part` labels), caption on
`stage2_referring` (needs Java), pope on `stage3_pos_neg`, describe on `stage3_detailed` (only with
`--judge-url`), and ovseg on a panoptic version of `stage2_categories` built here (visible object masks never
overlap, so each object is a thing segment and the uncovered pixels one `background` stuff segment).
Each command runs as its own `osprey eval` process (bench does not import eval); results, reports and
`summary.{md,json}` go to `--out`.
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

import numpy as np

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
BACKGROUND = "background"


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def build_panoptic(records_path: Path, out_dir: Path, limit: int | None) -> tuple[Path, Path, Path]:
    """COCO-panoptic json + PNGs + class list from object records whose masks do not overlap."""
    from PIL import Image

    from osprey.data.records import read_records, record_masks

    records = read_records(records_path)[:limit]
    names = sorted({r.category_name for rec in records for r in rec.annotation if r.category_name})
    cat_id = {name: k + 1 for k, name in enumerate(names)}
    bg_id = len(names) + 1
    png_dir = out_dir / "panoptic"
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n, rec in enumerate(records):
        masks = record_masks(rec)
        if masks.sum(axis=0).max(initial=0) > 1:
            raise ValueError(
                f"{records_path}: record {n} has overlapping region masks; cannot build panoptic GT"
            )
        ids = np.zeros((rec.height, rec.width), dtype=np.int64)
        segments = []
        for i, (region, mask) in enumerate(zip(rec.annotation, masks)):
            if region.category_name and mask.any():
                ids[mask] = i + 1
                segments.append({"id": i + 1, "category_id": cat_id[region.category_name], "iscrowd": 0})
        if (ids == 0).any():
            ids[ids == 0] = 1000
            segments.append({"id": 1000, "category_id": bg_id, "iscrowd": 0})
        rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / f"{n:06d}.png")
        images.append({"id": n, "file_name": rec.file_name, "height": rec.height, "width": rec.width})
        annotations.append({"image_id": n, "file_name": f"{n:06d}.png", "segments_info": segments})
    classes = [{"id": cat_id[name], "name": name, "isthing": True, "synonyms": [name]} for name in names]
    classes.append(
        {"id": bg_id, "name": BACKGROUND, "isthing": False, "synonyms": [BACKGROUND, "plain background"]}
    )
    categories = [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])} for c in classes]
    pan_json, classes_json = out_dir / "panoptic.json", out_dir / "classes.json"
    write_atomic(
        pan_json, json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    write_atomic(classes_json, json.dumps({"name": "synth", "classes": classes}, indent=1))
    return pan_json, png_dir, classes_json


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
        "--model",
        str(args.model),
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
    if cmd == "ovseg":
        pan_json, png_dir, classes_json = build_panoptic(data_file, out_dir / "ovseg_data", args.limit)
        argv[argv.index("--data") + 1] = str(pan_json)
        argv += ["--panoptic-root", str(png_dir), "--classes", str(classes_json)]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, type=Path, help="root of a generated dataset (osprey data synth --out)"
    )
    p.add_argument("--model", required=True, type=Path, help="model folder (in-process)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="test")
    p.add_argument("--only", nargs="*", default=None, help=f"run only these of {[e[0] for e in PLAN]}")
    p.add_argument("--limit", type=int, default=None, help="items (ovseg: images) per command")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="answer cap (the official 1024 is slow for a random model that never stops)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--judge-url", default=None)
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--judge-api-key", default=None)
    args = p.parse_args(argv)

    split_dir = args.data / args.split
    if not split_dir.is_dir():
        raise SystemExit(f"{split_dir} does not exist: is --data the root of an `osprey data synth` output?")
    args.out.mkdir(parents=True, exist_ok=True)
    contamination = _training_overlap(args.model, args.data, args.split)
    if contamination:
        print(f"warning: {contamination}", file=sys.stderr, flush=True)
    rows, report = [], {}
    for name, cmd, subset, metrics in PLAN:
        if args.only is not None and name not in args.only:
            continue
        data_file = split_dir / f"{subset}.json"
        if not data_file.exists():
            rows.append([name, "skipped", f"{data_file.name} missing", "", ""])
            report[name] = {"status": "skipped", "reason": f"{data_file} missing"}
            continue
        command = _command(name, cmd, data_file, args, args.out)
        if isinstance(command, str):
            rows.append([name, "skipped", command, "", ""])
            report[name] = {"status": "skipped", "reason": command}
            continue
        print(f"== {name}: {' '.join(command[2:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, text=True, capture_output=True, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            rows.append([name, "failed", tail[0][:200], "", f"{seconds:.1f}"])
            report[name] = {
                "status": "failed",
                "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-2000:],
            }
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        summary = json.loads((args.out / f"{name}.json").read_text())["summary"]
        shown = ", ".join(
            f"{m} {summary[m]:.2f}" if isinstance(summary[m], float) else f"{m} {summary[m]}" for m in metrics
        )
        items = summary.get("items", summary.get("regions", ""))
        rows.append([name, "ok", shown, str(items), f"{seconds:.1f}"])
        report[name] = {
            "status": "ok",
            "summary": summary,
            "seconds": round(seconds, 2),
            "results": f"{name}.json",
            "report": f"{name}.md",
        }

    lines = [
        f"# Evaluation summary: `{args.model}` on `{args.data}` ({args.split})",
        "",
        "| eval | status | metrics (x100) | items | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if contamination:
        lines += ["", f"**Warning: not a held-out evaluation.** {contamination}."]
    lines += [
        "",
        "Per-command reports: "
        + ", ".join(f"[{n}]({n}.md)" for n, v in report.items() if v["status"] == "ok"),
    ]
    write_atomic(args.out / "summary.md", "\n".join(lines) + "\n")
    write_atomic(
        args.out / "summary.json",
        json.dumps(
            {"model": str(args.model), "data": str(args.data), "split": args.split,
             "training_overlap": contamination, "evals": report}, indent=2
        )
        + "\n",
    )
    print("\n".join(lines))
    return 0 if all(v["status"] != "failed" for v in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
