"""`osprey bench NAME [ARGS...]`: run one of the project's benchmarks (each script's own --help lists its options)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "describe-speed": ("bench.describe_speed", "region-description throughput vs the official one-region-per-call flow"),
    "extractor-speed": ("bench.extractor_speed", "mask extractor fwd+bwd: one batched pass vs one pass per image"),
    "serve": ("bench.serve_bench", "regions/s and latency: official flow, engine, `osprey serve` over HTTP, vLLM (LLM half), vLLM-osprey"),
    "annotate-speed": ("bench.annotate_speed", "`osprey annotate` in-process against the engine: regions/s and their ratio"),
    "vllm-check": ("bench.vllm_osprey_check", "the vLLM backend on a GPU: describe/chat through `osprey serve --backend vllm`, token parity"),
    "engine-parity": ("bench.engine_parity", "the engine's greedy tokens against transformers' generate at real shapes"),
    "engine-profile": ("bench.engine_profile", "a torch profile of the engine's decoding step at a given load"),
    "load": ("bench.load", "concurrent clients against a loopback server: requests/s, latency, correctness"),
    "train-step": ("bench.train_step", "stage-3 DeepSpeed training step: tokens/s, MFU, peak memory"),
    "eval-all": ("bench.eval_all", "every `osprey eval` command on a generated test split, one summary table"),
    "token-norms": ("bench.token_norms", "norms of word, image, mask and position tokens: can the LLM tell regions apart?"),
    "step-profile": ("bench.step_profile", "a real training config's step: data loading vs compute, top ops"),
    "region-eval": ("bench.region_eval", "region-level accuracy and the mask/box/position/levels ablation"),
    "slot-attention": ("bench.slot_attention", "short-form answers: attention on the asked region's slot, per layer"),
    "api-fuzz": ("bench.api_fuzz", "schemathesis against the real server's /openapi.json: server errors, answers"),
    "classify-speed": ("bench.classify_speed", "label-list classification by likelihood: R regions x L labels, seconds"),
    "query-eval": ("bench.query_eval", "label-list top-1 and ECE, query counts (yes/no and label-list scores) on a split"),
    "search-eval": ("bench.search_eval", "text -> region search in PostgreSQL (pgvector): precision@10, mAP"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    listing = "\n".join(f"  {name:15s} {help}" for name, (_, help) in BENCHMARKS.items())
    parser = subparsers.add_parser(
        "bench", help="run a benchmark (describe-speed, extractor-speed, load, train-step, eval-all, region-eval, token-norms)",
        description=__doc__, epilog="benchmarks:\n" + listing, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (try NAME --help)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.name][0])
    status = module.main(args.args)
    return status if isinstance(status, int) else 0  # some benchmarks return their result dict
