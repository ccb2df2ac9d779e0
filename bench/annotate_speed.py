"""`osprey annotate` in-process against the engine it drives: regions/s of both on the same images and boxes.

The serving benchmark's workload (bench.serve_workload: images of rectangles, M random boxes each) is written as a
COCO instances file with RLE masks and PNG images in a temporary folder, then annotated by the real runner
(`serve.annotate.run_annotation` with `PipelineAnnotator`: reading, mask decoding, RLE and box of every region,
fsynced JSON lines). In the same run, on the same pipeline, the engine's closed loop (`bench.serve_workload.run_engine`)
answers the same images with I = max rows / M images in flight, the load the annotator keeps. Every region decodes
exactly --new-tokens tokens (EOS ignored), greedy. The ratio annotate / engine is the issue's target (>= 0.9).

    python -m bench.annotate_speed --preset osprey-7b --masks 16 --images 64 --max-rows 256 \\
        --out bench/results/annotate_speed_h100.json                    # add --fast-kernels for the Triton kernels
    python -m bench.annotate_speed --preset tiny --device cpu --masks 2 --images 4 --max-rows 4 --new-tokens 4

With --ray-actors N [N ...], the same COCO file also goes through `osprey annotate --ray` (Ray Data, a local Ray)
with N model replicas sharing this one GPU (--actors-per-gpu N, each sized to 1/N of it), for each N. Ray's actors
load a model folder, so without --model the preset's random weights are first written to one (osprey-7b: 14 GB)
and all systems run from it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.describe_speed import add_model_arguments
from bench.eval_all import write_atomic
from bench.serve_workload import (
    WARM_UP_REGIONS,
    Request,
    build_pipeline,
    git_commit,
    make_workload,
    run_engine,
    summarize,
)
from osprey import masks as mask_codecs
from serve.annotate import run_annotation
from serve.annotate_backends import AnnotateSettings, PipelineAnnotator
from serve.annotate_io import read_input

TARGET = 0.9  # annotate regions/s over the engine's, docs/annotate.md


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--masks", type=int, default=16, help="regions per image (M)")
    parser.add_argument("--images", type=int, default=64, help="images in all (a multiple of max rows / M)")
    parser.add_argument("--max-rows", type=int, default=256, help="region rows in flight (osprey annotate "
                                                                  "--max-batch-size)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="KV memory (default: as osprey serve)")
    parser.add_argument("--fast-kernels", action="store_true", help="CUDA: Triton decoding kernels, compiled layers")
    parser.add_argument("--ray-actors", type=int, nargs="*", default=[], metavar="N",
                        help="also annotate through Ray with N replicas on this device, for each N")
    parser.add_argument("--images-per-call", type=int, default=None,
                        help="--ray: images per actor call (default: all of an actor's images in one call)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (written atomically)")
    args = parser.parse_args(argv)
    in_flight = max(1, args.max_rows // args.masks)
    if args.images % in_flight:
        parser.error(f"--images {args.images} is not a multiple of the {in_flight} images in flight "
                     f"(--max-rows {args.max_rows} // --masks {args.masks})")

    model_name = args.model or args.preset
    progress = _Progress(args.out)
    with tempfile.TemporaryDirectory(prefix="annotate_speed_model_") as folder:
        if args.ray_actors and args.model is None:  # Ray's replicas load a folder: every system runs from it
            args.model = str(_random_model_folder(args.preset, args.device, Path(folder)))
            model_name = f"{args.preset} (random weights in a folder)"
            progress.log(f"random weights written to {args.model}")
        pipe = build_pipeline(args.preset, args.model, args.device, args.dtype)
        pipe.eos_token_id = -1  # every region decodes exactly --new-tokens tokens, in all systems
        device = pipe.device
        progress.report.update({
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "commit": git_commit(),
            "settings": {"model": model_name, "dtype": str(pipe.model.dtype), "masks": args.masks,
                         "images": args.images, "images_in_flight": in_flight, "max_rows": args.max_rows,
                         "new_tokens": args.new_tokens, "fast_kernels": args.fast_kernels, "task": "short",
                         "greedy": True, "eos": "ignored", "torch": torch.__version__}})
        progress.log("pipeline loaded; engine run")
        workload = make_workload(in_flight, args.masks, args.images // in_flight, seed=0)
        engine = run_engine(pipe, workload, args.new_tokens, args.max_rows, args.kv_cache_gb, args.fast_kernels)
        engine_summary = progress.add("engine", summarize(engine))
        requests = [r for client in workload.clients for r in client]
        annotate = progress.add("annotate", _run_annotate(pipe, requests, args))
        ratio = annotate["regions_per_s"] / engine_summary["regions_per_s"]
        progress.report.update({"ratio": ratio, "target": TARGET, "meets_target": ratio >= TARGET})
        progress.log(f"annotate {annotate['regions_per_s']:.2f} regions/s, engine "
                     f"{engine_summary['regions_per_s']:.2f} regions/s: ratio {ratio:.3f} (target {TARGET})")
        if args.ray_actors:
            del pipe, engine  # the replicas load their own copies
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for actors in args.ray_actors:
                progress.log(f"Ray with {actors} replica(s)")
                progress.add("ray", _run_ray(requests, actors, args), many=True)
    return progress.finish()


class _Progress:
    """The report as it grows: each phase's figures are printed and written (atomically, `complete: false`) as
    soon as they exist, so a run cut off by a time limit still leaves what it measured."""

    def __init__(self, out: Path | None) -> None:
        self.out, self.started = out, time.monotonic()
        self.report: dict = {"complete": False}

    def log(self, message: str) -> None:
        print(f"[annotate_speed +{time.monotonic() - self.started:.0f} s] {message}", flush=True)

    def add(self, key: str, figures: dict, many: bool = False) -> dict:
        if many:
            self.report.setdefault(key, []).append(figures)
        else:
            self.report[key] = figures
        self.log(f"{key}: {json.dumps(figures)}")
        self._write()
        return figures

    def finish(self) -> dict:
        self.report["complete"] = True
        self._write()
        return self.report

    def _write(self) -> None:
        if self.out:
            write_atomic(self.out, json.dumps(self.report, indent=2) + "\n")


def _run_annotate(pipe, requests: list[Request], args: argparse.Namespace) -> dict:
    """`run_annotation` over the requests written as a COCO dataset, after a warm-up on the same session."""
    gc.collect()  # the engine run's KV pool goes before the annotator sizes its own
    settings = AnnotateSettings("short", max_tokens=args.new_tokens)
    annotator = PipelineAnnotator(pipe, settings, "bench", max_rows=args.max_rows, fast_kernels=args.fast_kernels)
    with tempfile.TemporaryDirectory(prefix="annotate_speed_") as folder:
        root = Path(folder)
        coco = write_coco_dataset(requests, root / "images", root / "instances.json")
        items = read_input(str(coco), str(root / "images"))
        for regions in WARM_UP_REGIONS:  # the engine's warm-up: one region alone, then two
            run_annotation([replace(items[0], regions=items[0].regions[:regions])], annotator,
                           root / f"warm-up-{regions}.jsonl", progress=False)
        summary = run_annotation(items, annotator, root / "out.jsonl", progress=False)
    expected = sum(len(r.boxes) for r in requests)
    if summary.failures or summary.regions != expected:
        raise RuntimeError(f"annotate wrote {summary.regions} of {expected} regions; failures: "
                           f"{summary.failures[:3]}")
    return {"regions": summary.regions, "seconds": summary.seconds,
            "regions_per_s": summary.regions / summary.seconds,
            "output_tokens_per_s": summary.regions * args.new_tokens / summary.seconds}


def _random_model_folder(preset: str, device: str, folder: Path) -> Path:
    """The preset's random weights as a model folder (bfloat16 for a GPU, as the in-process build uses)."""
    from osprey.checkpoint import init_model_folder

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    print(f"writing random {preset} weights ({dtype}) to {folder} for Ray's replicas", flush=True)
    return init_model_folder(preset, folder / preset, dtype=dtype)


def _run_ray(requests: list[Request], actors: int, args: argparse.Namespace) -> dict:
    """The same COCO file through `RayAnnotator` with `actors` replicas on this one device. Ray Data starts its
    actors per run, so the replicas' load is inside the run: the report gives the whole run and the rate after
    the first call's results arrived (each call fills a replica's rows once: images in flight / actors)."""
    from serve.annotate_backends import RayAnnotator, RayPlacement

    on_gpu = args.device.startswith("cuda")
    in_flight = max(1, args.max_rows // args.masks)
    per_call = args.images_per_call or max(1, in_flight // actors)
    placement = RayPlacement(actors=actors, actors_per_gpu=actors if on_gpu else 1, images_per_call=per_call,
                             max_rows=max(1, args.max_rows // actors), fast_kernels=args.fast_kernels)
    annotator = RayAnnotator(args.model, AnnotateSettings("short", max_tokens=args.new_tokens), None, placement,
                             device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory(prefix="annotate_speed_ray_") as folder:
        root = Path(folder)
        items = read_input(str(write_coco_dataset(requests, root / "images", root / "instances.json")),
                           str(root / "images"))
        started, arrivals = time.monotonic(), []
        for result in annotator.map(items):
            if result.failures:
                raise RuntimeError(f"Ray failed regions: {result.failures[:3]}")
            arrivals.append((time.monotonic() - started, len(result.records)))
    first_s = arrivals[0][0]
    later = [(t, n) for t, n in arrivals if t > first_s + 0.5]  # a call's results arrive together
    run = {"actors": actors, "actors_per_gpu": placement.actors_per_gpu, "images_per_call": per_call,
           "max_rows_per_actor": placement.max_rows, "regions": sum(n for _, n in arrivals),
           "seconds": arrivals[-1][0], "regions_per_s": sum(n for _, n in arrivals) / arrivals[-1][0],
           "first_results_s": first_s,
           "after_first_regions_per_s": (sum(n for _, n in later) / (later[-1][0] - first_s)) if later else None}
    if run["regions"] != sum(len(r.boxes) for r in requests):
        raise RuntimeError(f"Ray answered {run['regions']} regions of {sum(len(r.boxes) for r in requests)}")
    return run


def write_coco_dataset(requests: list[Request], images: Path, path: Path) -> Path:
    """The requests as PNG files and a COCO instances JSON whose annotations hold each box's mask as RLE."""
    images.mkdir(parents=True)
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "region"}]}
    for index, request in enumerate(requests):
        name = f"{index:06d}.png"
        request.image.save(images / name)
        coco["images"].append({"id": index, "file_name": name, "height": request.image.height,
                               "width": request.image.width})
        for mask, box in zip(request.masks, request.boxes, strict=True):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": index, "category_id": 1,
                                        "segmentation": mask_codecs.encode_rle(mask), "bbox": box,
                                        "area": int(mask.sum()), "iscrowd": 0})
    write_atomic(path, json.dumps(coco))
    return path


if __name__ == "__main__":
    main()
