"""Label-list classification speed: one image, R regions x L labels scored by likelihood (osprey.scoring), on
random weights of a preset's shapes (the work of the real model; the answers are meaningless).

    python -m bench.classify_speed --preset osprey-7b --out bench/results/classify_speed_h100.json   # GPU, bf16
    python -m bench.classify_speed --preset tiny --device cpu --regions 4 --labels 20                 # smoke

Reported per configuration: seconds from the image file to the probabilities (encode the image, the regions'
tokens, the scoring pass), and of the scoring pass alone (image already encoded), as the median of --repeats runs
after one warm-up; the rows scored, the tokens per label and the peak GPU memory. `--profile`: one more scoring
pass under torch.profiler, its ops by device time (where a missed target's time goes) in the report.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.describe_speed import add_model_arguments, build_pipeline
from bench.eval_all import write_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--labels", type=int, default=100, help="labels (ADE20K-150 class names, then numbered)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--profile", action="store_true", help="add the top ops of one profiled scoring pass")
    parser.add_argument("--out", default=None, help="JSON results file")
    return parser.parse_args(argv)


def label_list(count: int) -> list[str]:
    """`count` realistic class names: ADE20K-150's, then numbered ones if more are asked for."""
    from eval.vocab import load_vocabulary

    names = [c.synonyms[0] for c in load_vocabulary("ade20k_150").classes]
    return (names + [f"object {i}" for i in range(count)])[:count]


def workload(regions: int, size: int) -> tuple[Image.Image, np.ndarray]:
    """A random image and `regions` random boxes as masks (the masks' content does not change the work)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    masks = np.zeros((regions, size, size), bool)
    for q in range(regions):
        x, y = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 16, size // 2, 2)
        masks[q, y:y + h, x:x + w] = True
    return image, masks


def timed(function, device: torch.device, repeats: int) -> list[float]:
    function()  # warm-up: kernels chosen, memory pools grown
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    from osprey.scoring import AnswerScorer

    args = parse_args(argv)
    args_for_build = argparse.Namespace(preset=args.preset, model=args.model, device=args.device, dtype=args.dtype,
                                        regions=args.regions)
    pipe = build_pipeline(args_for_build)
    scorer = AnswerScorer(pipe)
    image, masks = workload(args.regions, args.image_size)
    labels = label_list(args.labels)
    device = pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encoded = pipe.encode_image(image)
    end_to_end = timed(lambda: scorer.classify(pipe.encode_image(image), masks, labels), device, args.repeats)
    scoring = timed(lambda: scorer.classify(encoded, masks, labels), device, args.repeats)
    scores = scorer.classify(encoded, masks, labels)
    report = {
        "benchmark": "classify_speed",
        "model": args.model or args.preset, "dtype": str(pipe.model.dtype), "device": _device_name(device),
        "regions": args.regions, "labels": args.labels, "rows": args.regions * args.labels,
        "tokens_per_label": {"mean": float(scores.answer_tokens.mean()), "max": int(scores.answer_tokens.max())},
        "image_size": args.image_size, "repeats": args.repeats,
        "seconds": round(statistics.median(end_to_end), 4),
        "seconds_scoring_only": round(statistics.median(scoring), 4),
        "seconds_all": [round(t, 4) for t in end_to_end],
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "probabilities_sum_to_one": bool(np.allclose(scores.probabilities.sum(axis=1), 1.0, atol=1e-6)),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.profile:
        report["profile"] = _profile(lambda: scorer.classify(encoded, masks, labels), device)
        print(report["profile"])
    print(json.dumps({k: v for k, v in report.items() if k != "profile"}, indent=2))
    if args.out:
        write_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
    return report


def _profile(function, device: torch.device, rows: int = 25) -> str:
    """One call under torch.profiler -> its ops, most device time first (CPU time on a CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


if __name__ == "__main__":
    main()
