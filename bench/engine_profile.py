"""Where the engine's time goes: a torch profile of decoding steps at a given load (masks x images in flight).

    python -m bench.engine_profile --preset osprey-7b --masks 16 --images 16

Prints the top device kernels and the host time per step against the device time per step (a step bound by
launching kernels shows host >= device).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.serve_workload import build_pipeline, make_workload
from osprey.generation import SamplingParams
from osprey.prompts import task_prompt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="osprey-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fast-kernels", action="store_true",
                        help="the Triton decoding kernels and compiled layer pieces (docs/engine.md)")
    args = parser.parse_args(argv)
    pipe = build_pipeline(args.preset, None, args.device, None)
    pipe.eos_token_id = -1
    session = pipe.session(pipe.engine_pool(args.masks * args.images, 64 + 256), fast_kernels=args.fast_kernels)
    forward = session.decoder.forward
    print(f"Triton decoding kernels: {forward.decode_kernel}; compiled layers: {forward.fused is not None}")
    params = SamplingParams(max_new_tokens=64)
    for (request,) in make_workload(args.images, args.masks, 1, seed=3).clients:
        prompts = pipe.prepare_each(pipe.encode_image(request.image), [("human", task_prompt("short"))], request.masks)
        session.add(pipe.group_requests(prompts, [params] * len(prompts),
                                        row_ids=[(id(request), q) for q in range(len(prompts))]))
    while session.decoder.waiting:
        session.step()  # prefill everything first
    for _ in range(3):
        session.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        session.step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    step = session.decoder.decode_step
    print(f"{session.live_rows} rows: {per_step * 1000:.2f} ms per decoding step ({session.live_rows / per_step:.0f} "
          f"tokens/s); CUDA graphs {'on' if step.use_graphs else 'off'}, {len(step._graphs)} recorded")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            session.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
