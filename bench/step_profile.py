"""Where a training step's time goes, on a real config and dataset: data loading vs the step, and the top ops.

Builds the run exactly as `osprey train` does (`train.recipe.Recipe`: model, stage freezing, dataset, DeepSpeed
engine), then times
  1. `--steps` steps fed by the real data loader (what a run sees; at least 3 per worker, to drain the prefetch),
  2. `--steps` steps on one pre-loaded batch repeated (the step alone: no loading, no host-to-device copies
     beyond the batch's own),
and profiles `--profile-steps` steps of (2) with torch.profiler, printing the ops that take the most device
time (CUDA) or CPU time, and counting the ATen ops a step dispatches (`aten_ops_per_step`; the step time over
that count, `host_us_per_op_if_op_bound`, is the host cost per op if dispatching them is what bounds the step).
Writes nothing into the run's output folder except DeepSpeed's own state.

    python -m bench.step_profile --stage 3 --config builtin_stage3 --set data.root=data/synth6k \\
        --model runs/builtin/init --out step_profile.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch


def _time_steps(recipe, batches, device: torch.device) -> list[float]:
    times = []
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = recipe.micro_step(batch() if callable(batch) else batch)
        float(loss)  # waits for the step
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> dict:
    from train.cli import resolve_config
    from train.recipe import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        args.output = args.output or str(Path(tmp) / "run")
        cfg = resolve_config(args)
        if cfg.global_batch_size != cfg.micro_batch_size:
            raise SystemExit("step_profile times single micro-batch steps: set global_batch_size = micro_batch_size")
        recipe = Recipe(cfg)
        recipe.setup()
        device = recipe.device
        recipe.engine.train()
        if not cfg.train_vision:
            recipe.model.vision_tower.eval()
        loader = iter(recipe.loader())

        def next_batch():
            start = time.perf_counter()
            batch = next(loader)
            waits.append(time.perf_counter() - start)
            return batch

        waits: list[float] = []
        _time_steps(recipe, [next_batch for _ in range(args.warmup)], device)
        waits.clear()
        # Enough steps to drain the loader's prefetch (2 batches per worker), else a slow loader goes unseen.
        loader_steps = max(args.steps, 3 * cfg.data.num_workers)
        loaded = _time_steps(recipe, [next_batch for _ in range(loader_steps)], device)
        fixed = next(loader)
        repeated = _time_steps(recipe, [fixed] * args.steps, device)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            _time_steps(recipe, [fixed] * args.profile_steps, device)
        # ATen ops dispatched per step (nested ones included): for a small model on a GPU the host pays for each,
        # so a step whose time does not grow with the batch is bound by this count, not by the device
        aten_ops = sum(1 for event in prof.events() if event.name.startswith("aten::")) / args.profile_steps
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
        print(table)
        tokens = int(fixed["attention_mask"].sum())
        samples = fixed["input_ids"].shape[0]
        result = {
            "config": args.config, "stage": cfg.stage, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "micro_batch_size": cfg.micro_batch_size, "tokens_per_batch": tokens,
            "step_s_with_loader": mean(loaded), "loader_wait_s": mean(waits),
            "step_s_fixed_batch": mean(repeated),
            "samples_per_s_with_loader": samples / mean(loaded), "samples_per_s_fixed_batch": samples / mean(repeated),
            "aten_ops_per_step": aten_ops, "host_us_per_op_if_op_bound": 1e6 * mean(repeated) / aten_ops,
            "num_workers": cfg.data.num_workers, "torch": torch.__version__,
            "top_ops": table,
        }
        recipe.close()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=[1, 2, 3])
    parser.add_argument("--config", required=True, help="YAML config: a path or a name in train/configs/")
    parser.add_argument("--model", help="override model (start folder or preset)")
    parser.add_argument("--output", help="scratch output_dir (default: a temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-limit", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--print-config", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler")
    parser.add_argument("--rows", type=int, default=25, help="ops listed")
    parser.add_argument("--out", help="write the result JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    summary = {k: v for k, v in result.items() if k != "top_ops"}
    print(json.dumps(summary, indent=2))
    if args.out:
        from bench.eval_all import write_atomic

        write_atomic(Path(args.out), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
