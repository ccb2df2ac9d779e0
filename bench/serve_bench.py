"""Serving benchmark: regions/s and latency of the official flow, our engine in-process, `osprey serve` over HTTP,
vLLM on the LLM half of the same workload, and the whole model on vLLM (our plugin), on one device in one run.

The workload: clients that each send one image with M region masks ("describe", short prompt) and send their next
image when every region of the last one is answered; I clients at once = I images in flight. Every region decodes
exactly --new-tokens tokens (EOS ignored), greedy. Per configuration (system, M, I): regions/s, output tokens/s,
p50/p99 latency per region and per request (from the request's start), time to first token, peak GPU memory.

    python -m bench.serve_bench --preset osprey-7b --out bench/results/serve_bench_h100.json
    python -m bench.serve_bench --preset tiny --device cpu --masks 1 4 --images 1 2 --new-tokens 8    # smoke
    python -m bench.serve_bench --systems engine vllm vllm-osprey --masks 1 16 --images 1 16 --out X.json  # vLLM
    python -m bench.serve_bench --systems server --devices cuda:0 cuda:1 --masks 16 64 --images 16 64 --out X.json
    python -m bench.serve_bench --systems vllm-osprey --vllm-tensor-parallel 1 2 --masks 16 --images 16 --out X.json

With --devices, the server systems run one engine replica per device (`osprey serve --devices`) and are measured on
the first device alone and on all of them; with --vllm-tensor-parallel 1 2, vllm-osprey runs on one vLLM engine
over 1 GPU, then over 2 (tensor parallel). `device_scaling` in the report is regions/s on N devices over one, and
that ratio per device.

"vllm-osprey" needs a model folder for vLLM to load: the random weights are written to --vllm-folder once (14 GB
at 7B; a rerun with the same preset reuses it).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench.describe_speed import add_model_arguments
from bench.serve_vllm import vllm_available
from bench.serve_workload import (
    Measurement,
    Workload,
    build_pipeline,
    git_commit,
    make_workload,
    run_engine,
    run_official,
    run_server,
    summarize,
)

SYSTEMS = ["official", "engine", "engine-fast", "server", "server-fast", "vllm", "vllm-osprey"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 16, 64], help="masks per image (M)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16, 64], help="images in flight (I)")
    parser.add_argument("--waves", type=int, default=2, help="images each client sends in turn")
    parser.add_argument("--max-regions-per-config", type=int, default=2048,
                        help="fewer waves for large M x I so one configuration stays short")
    parser.add_argument("--systems", nargs="+", default=["official", "engine", "server", "vllm", "vllm-osprey"],
                        choices=SYSTEMS, help="engine-fast / server-fast: the same with the Triton decoding kernels "
                                              "and compiled layers (`osprey serve --fast-kernels`)")
    parser.add_argument("--vllm-folder", default=None,
                        help="where vllm-osprey's model folder is written (default: the one bench.vllm_osprey_check "
                             "writes, /tmp/osprey-vllm-check/model-PRESET; the --model folder itself if given)")
    parser.add_argument("--vllm-memory", type=float, default=0.6, help="vllm-osprey: vLLM's share of the GPU")
    parser.add_argument("--vllm-tensor-parallel", type=int, nargs="+", default=[1], metavar="GPUS",
                        help="vllm-osprey: measured on one vLLM engine over each number of GPUs in turn (1 2: one GPU, "
                             "then two with tensor parallelism; the scaling is in device_scaling)")
    parser.add_argument("--official-regions", type=int, default=3, help="regions timed for the official flow")
    parser.add_argument("--max-rows", type=int, default=512, help="engine rows in flight (server --max-batch-size)")
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                        help="server systems: one engine replica per device (a random-weights model built on each), "
                             "measured on the first alone and on all; the other systems run on the first")
    parser.add_argument("--out", default=None, help="JSON results file (a PNG plot is written beside it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.devices:
        args.device = args.devices[0]
    pipe = build_pipeline(args.preset, args.model, args.device, args.dtype)
    replica_pipes = [pipe]  # the server systems' replicas: one model per device
    if args.devices and {"server", "server-fast"} & set(args.systems):
        replica_pipes += [build_pipeline(args.preset, args.model, device, args.dtype) for device in args.devices[1:]]
    for each in replica_pipes:
        each.eos_token_id = -1  # never stop early: every region decodes exactly --new-tokens tokens
    results: list[Measurement] = []
    if {"vllm", "vllm-osprey"} & set(args.systems) and not vllm_available():
        print("vLLM is not installed: its columns are left out (bench/gpu_install.sh installs it on the GPU machine)")
        args.systems = [s for s in args.systems if s not in ("vllm", "vllm-osprey")]
    if "official" in args.systems:
        results.append(run_official(pipe, make_workload(1, args.official_regions, 1, seed=0), args.new_tokens))
        print(json.dumps(summarize(results[-1])), flush=True)
    workloads = [_workload(args, masks, images) for masks in args.masks for images in args.images]
    # vLLM last: its engine keeps most of the GPU memory once started (the LLM half's stops before the full model's)
    for system in SYSTEMS[1:]:
        if system in args.systems:
            if system in ("vllm", "vllm-osprey"):  # our engines' (or the LLM half's) memory freed first
                from bench.serve_vllm import LLM_HALF_MEMORY, shutdown_llm_half

                if system == "vllm-osprey":
                    shutdown_llm_half()
                gc.collect()  # our engines' pools are garbage by now, but still in torch's cache until collected
                _wait_for_free_memory(LLM_HALF_MEMORY if system == "vllm" else args.vllm_memory)
            for width in _widths(system, args, replica_pipes):  # devices one after the other, workloads within
                for workload in workloads:
                    results.append(_run(system, args, replica_pipes[:width], workload, width))
                    _write(args, _report(args, pipe, results))  # a run cut short keeps what it measured
    report = _report(args, pipe, results)
    if args.out:
        _plot(report, Path(args.out).with_suffix(".png"))
    return report


def _wait_for_free_memory(share: float, timeout_s: float = 60.0) -> None:
    """vLLM refuses to start unless `share` of the GPU is free: give the stopped engine's process time to exit, and
    hand back the blocks our engine's pools left in torch's cache."""
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free >= share * total:
            return
        time.sleep(0.5)
    print(f"warning: only {free / 2**30:.1f} GiB of the GPU are free; vLLM asks for {share * total / 2**30:.1f}")


def _write(args: argparse.Namespace, report: dict) -> None:
    if not args.out:
        return
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


def _workload(args: argparse.Namespace, masks: int, images: int) -> Workload:
    waves = max(1, min(args.waves, args.max_regions_per_config // (masks * images)))
    return make_workload(images, masks, waves, seed=masks * 1000 + images)


def _widths(system: str, args: argparse.Namespace, replica_pipes: list) -> list[int]:
    """The device counts `system` is measured on: replicas of the server systems, vllm-osprey's tensor-parallel
    sizes, else one."""
    if system.startswith("server"):
        return sorted({1, len(replica_pipes)})
    if system == "vllm-osprey":
        return sorted(set(args.vllm_tensor_parallel))
    return [1]


def _run(system: str, args: argparse.Namespace, pipes: list, workload: Workload, width: int = 1) -> Measurement:
    """`system` on `workload`: the server systems with one engine replica per pipeline, vllm-osprey over `width`
    GPUs, the others on the first device."""
    pipe = pipes[0]
    if system in ("engine", "engine-fast"):
        m = run_engine(pipe, workload, args.new_tokens, args.max_rows, args.kv_cache_gb, system == "engine-fast")
    elif system in ("server", "server-fast"):
        m = run_server(pipes, workload, args.new_tokens, args.max_rows, args.kv_cache_gb, system == "server-fast")
    elif system == "vllm":
        from bench.serve_vllm import run_vllm

        m = run_vllm(pipe, workload, args.new_tokens)
    else:
        from bench.serve_vllm import model_folder, run_vllm_osprey

        folder = Path(args.model) if args.model else model_folder(
            pipe, Path(args.vllm_folder or f"/tmp/osprey-vllm-check/model-{args.preset}"), args.preset)
        m = run_vllm_osprey(folder, workload, args.new_tokens, args.vllm_memory, tensor_parallel=width)
    print(json.dumps(summarize(m)), flush=True)
    return m


def _report(args: argparse.Namespace, pipe, results: list[Measurement]) -> dict:
    device = torch.cuda.get_device_name() if pipe.device.type == "cuda" else platform.processor() or "cpu"
    commit = git_commit()
    settings = {"model": args.model or args.preset, "dtype": str(pipe.model.dtype), "new_tokens": args.new_tokens,
                "task": "short", "greedy": True, "eos": "ignored", "waves": args.waves, "max_rows": args.max_rows,
                "devices": args.devices or [args.device], "torch": torch.__version__}
    return {"device": device, "commit": commit, "settings": settings, "results": [summarize(m) for m in results],
            "summary": _speedups(results), "device_scaling": _device_scaling(results)}


def _speedups(results: list[Measurement]) -> list[dict]:
    """Each engine (default and fast kernels) against the other systems per configuration (one replica each)."""
    by_key = {(m.system, m.masks_per_image, m.images_in_flight): m for m in results if _devices(m) == 1}
    official = next((m for m in results if m.system == "official"), None)
    rows = []
    for (system, masks, images), m in by_key.items():
        if system not in ("engine", "engine-fast"):
            continue
        row = {"system": system, "masks_per_image": masks, "images_in_flight": images,
               "regions_per_s": m.regions_per_s}
        for other in SYSTEMS[1:]:
            o = by_key.get((other, masks, images))
            if other != system and o is not None:
                row[f"over_{other}"] = m.regions_per_s / o.regions_per_s
        if official is not None:
            row["over_official"] = m.regions_per_s / official.regions_per_s
        rows.append(row)
    return rows


def _devices(m: Measurement) -> int:
    return m.replicas * m.tensor_parallel


def _device_scaling(results: list[Measurement]) -> list[dict]:
    """A system on N devices (server replicas, vLLM tensor parallel) against the same on one: regions/s ratio, and
    that ratio per device."""
    single = {(m.system, m.masks_per_image, m.images_in_flight): m for m in results if _devices(m) == 1}
    rows = []
    for m in results:
        one = single.get((m.system, m.masks_per_image, m.images_in_flight))
        if _devices(m) > 1 and one is not None:
            speedup = m.regions_per_s / one.regions_per_s
            rows.append({"system": m.system, "masks_per_image": m.masks_per_image,
                         "images_in_flight": m.images_in_flight, "replicas": m.replicas,
                         "tensor_parallel": m.tensor_parallel, "devices": _devices(m),
                         "regions_per_s": m.regions_per_s, "over_1_device": speedup,
                         "per_device_efficiency": speedup / _devices(m)})
    return rows


def _label(result: dict) -> str:
    replicas, tensor_parallel = result["replicas"], result.get("tensor_parallel", 1)
    return (result["system"] + (f" x{replicas}" if replicas > 1 else "")
            + (f" tp{tensor_parallel}" if tensor_parallel > 1 else ""))


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = sorted({_label(r) for r in report["results"] if r["system"] != "official"})
    configs = sorted({(r["masks_per_image"], r["images_in_flight"]) for r in report["results"] if r["system"] != "official"})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(configs)), 4))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        values = [next((r["regions_per_s"] for r in report["results"] if _label(r) == system
                        and (r["masks_per_image"], r["images_in_flight"]) == c), 0.0) for c in configs]
        ax.bar(np.arange(len(configs)) + i * width, values, width, label=system)
    ax.set_xticks(np.arange(len(configs)) + width * (len(systems) - 1) / 2,
                  [f"M={m}\nI={i}" for m, i in configs])
    ax.set_ylabel("regions / s")
    ax.set_title(f"{report['device']}: {report['settings']['model']}, {report['settings']['new_tokens']} tokens per region")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
