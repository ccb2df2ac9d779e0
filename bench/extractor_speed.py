"""Mask-extractor forward + backward for a training batch: one batched pass (what the model runs) against one pass
per image (what it ran before, and what the official code does), same weights, same inputs, same device.

    python bench/extractor_speed.py --preset builtin --batch 64 --regions 4 --device cpu
    python bench/extractor_speed.py --preset osprey-7b --batch 4 --regions 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="builtin")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--regions", type=int, default=4, help="masks per image")
    parser.add_argument("--mask-size", type=int, default=256, help="masks are (regions, S, S), the image's size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from osprey.config import OspreyConfig
    from osprey.mask_extractor import MaskExtractor

    config = OspreyConfig.from_preset(args.preset)
    device = torch.device(args.device)
    torch.manual_seed(0)
    extractor = MaskExtractor(config.extractor, config.vision.level_channels, config.hidden_size).to(device)
    extractor.reset_parameters()
    sides = [config.vision.image_size // s for s in config.vision.level_strides]
    levels = [torch.randn(args.batch, c, s, s, device=device) for c, s in zip(config.vision.level_channels, sides)]
    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(rng.random((args.regions, args.mask_size, args.mask_size)) > 0.7).to(device)
             for _ in range(args.batch)]

    def batched() -> None:
        tokens, pos = extractor(levels, masks)
        (tokens.sum() + pos.sum()).backward()

    def per_image() -> None:
        outs = [extractor([level[i:i + 1] for level in levels], [m]) for i, m in enumerate(masks)]
        (sum(t.sum() for t, _ in outs) + sum(p.sum() for _, p in outs)).backward()

    def timed(fn) -> float:
        fn()  # warm-up
        _sync(device)
        times = []
        for _ in range(args.repeats):
            extractor.zero_grad()
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    loop_s, batch_s = timed(per_image), timed(batched)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'}, "
                  f"{torch.get_num_threads()} threads)",
        "preset": args.preset, "batch": args.batch, "regions_per_image": args.regions, "mask_size": args.mask_size,
        "per_image_s": loop_s, "batched_s": batch_s, "speedup": loop_s / batch_s, "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
