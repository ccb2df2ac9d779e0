"""How long a training run's dataset takes to build before its first step: record index plus length estimates.

Builds the dataset of a stage config as `osprey train` does (`train.recipe.dataset_from_config`) with the length
estimates in 0 worker processes and in `--workers`, checks both give the same lengths, and prints the seconds of each.
On a time-boxed GPU machine this is time no step runs in (the built-in model's last stage-3 mix: 315,000 samples).

    python -m bench.data_index --config builtin_stage3_final --data data/synth --workers 15
"""

from __future__ import annotations

import argparse
import json
import time


def build_seconds(config: str, data: str, model: str, workers: int) -> tuple[float, list[int]]:
    """(seconds to build the dataset and its lengths, the lengths) for `config` on `data` with `workers`."""
    import yaml

    from osprey.checkpoint import read_config
    from osprey.tokenization import load_tokenizer
    from train.config import load_config, resolve_config_path
    from train.recipe import dataset_from_config

    raw = yaml.safe_load(resolve_config_path(config).read_text())
    raw.setdefault("data", {}).update(root=data, num_workers=workers)
    raw["model"] = model
    cfg = load_config(raw=raw)
    tokenizer, model_config = load_tokenizer(model), read_config(model)
    start = time.perf_counter()
    _, _, lengths = dataset_from_config(cfg, tokenizer, model_config)
    return time.perf_counter() - start, lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="builtin_stage3_final", help="a stage config (name or path)")
    parser.add_argument("--data", required=True, help="the dataset folder (data.root)")
    parser.add_argument("--model", default="osprey/assets/builtin", help="a model folder (tokenizer and config)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the parallel estimate")
    args = parser.parse_args(argv)
    serial, serial_lengths = build_seconds(args.config, args.data, args.model, 0)
    parallel, parallel_lengths = build_seconds(args.config, args.data, args.model, args.workers)
    if serial_lengths != parallel_lengths:
        raise SystemExit("the parallel length estimates differ from the serial ones")
    print(json.dumps({"config": args.config, "samples": len(serial_lengths), "seconds_0_workers": round(serial, 1),
                      f"seconds_{args.workers}_workers": round(parallel, 1), "same_lengths": True}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
