"""`osprey serve` (the OpenAI-compatible region server), `osprey describe` (one image, in-process),
`osprey annotate` (every region of a dataset, resumable) and `osprey index` (region search, serve.index_cli)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import index_cli, regions_cli
from .engine import BURST_WAITS

log = logging.getLogger(__name__)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help already says it (the API key's would leak)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible region server (chat completions + /v1/regions/describe)",
        description="Serve a model folder over HTTP: POST /v1/chat/completions (OpenAI schema, regions as "
                    "<region1>.. with a top-level 'regions' list or RGBA mask images), POST /v1/regions/describe, "
                    "POST /v1/segment (with --sam / --sam3), GET /v1/models, /health, /metrics; the playground "
                    "page at / and the API docs at /docs. See docs/serve.md and docs/playground.md.",
        formatter_class=_DefaultsHelp)
    serve.add_argument("--model", default=None, help="model folder (default: $OSPREY_MODEL or the installed default)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--fd", type=int, default=None, metavar="N",
                       help="serve on an inherited socket, already bound and listening, from file descriptor N (a "
                            "supervisor's or a test's: it knows the port without racing for it); --host/--port then "
                            "only name it in the logs")
    serve.add_argument("--api-key", default=os.environ.get("OSPREY_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: $OSPREY_API_KEY; none = open)")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--device", default=None, help="cpu, cuda or cuda:N: one engine (default: cpu)")
    where.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                       help="one engine replica per device (e.g. --devices cuda:0 cuda:1), each request to the least "
                            "loaded; embeddings and SAM run on the first (docs/serve.md, Several GPUs)")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: the folder's)")
    serve.add_argument("--cpu-threads", type=int, default=None,
                       help="torch threads when decoding on CPU (default: all cores but one)")
    serve.add_argument("--served-model-name", default="", help="model id in /v1/models (default: folder name)")
    serve.add_argument("--backend", default="engine", choices=["engine", "vllm"],
                       help="engine: our continuous-batching engine in this process; vllm: the whole model on vLLM's "
                            "async engine (GPU; the vllm extra; docs/vllm.md)")
    serve.add_argument("--max-batch-size", type=int, default=None,
                       help="region rows decoded together across requests (continuous batching; default 8 for the "
                            "engine, on a GPU try 256; vllm: its max_num_seqs, default 256)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                       help="--backend vllm: share of the GPU vLLM takes (weights, KV cache, activations)")
    serve.add_argument("--tensor-parallel-size", type=int, default=1, help="--backend vllm: GPUs per model")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="--backend vllm: no CUDA graphs or compilation (starts faster, decodes slower)")
    serve.add_argument("--kv-cache-gb", type=float, default=None,
                       help="KV memory of the engine (default: 90%% of the GPU memory left after loading; 1 GiB on CPU)")
    serve.add_argument("--max-row-tokens", type=int, default=None,
                       help="tokens held per region row: its prompt after the image + its answer "
                            "(default: --max-tokens-limit + 256); smaller fits more rows in the KV memory")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="an idle server waits this long for more requests before it starts (for a burst that "
                            f"keeps arriving: up to {BURST_WAITS}x this)")
    serve.add_argument("--fast-kernels", action=argparse.BooleanOptionalAction, default=True,
                       help="engine on CUDA: the Triton decoding kernels and compiled layer pieces, each checked "
                            "against the reference at start-up, faster at every load measured (docs/engine.md); "
                            "--no-fast-kernels: FlashAttention and the eager layer modules")
    serve.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 429")
    serve.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request before 504")
    serve.add_argument("--max-regions", type=int, default=64, help="regions per request")
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (MiB)")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image (pixels)")
    serve.add_argument("--image-cache-size", type=int, default=16, help="encoded images kept (LRU)")
    serve.add_argument("--sam", default=None, metavar="PATH",
                       help="a local transformers SAM folder: enables clicks, boxes and segment everything "
                            "(/v1/segment, the playground); nothing is downloaded")
    serve.add_argument("--sam3", default=None, metavar="PATH",
                       help="a local transformers SAM 3 folder: enables text concepts (/v1/segment with text)")
    serve.add_argument("--allow-image-urls", action="store_true", help="let clients send http(s) image URLs")
    serve.add_argument("--clip-weights", default=None, metavar="FILE",
                       help="open_clip file whose text tower serves /v1/embeddings for a model folder without its own "
                            "(the official convnext_large_d_320 file)")
    serve.add_argument("--index", default=None, metavar="URL|DIR",
                       help="region index database for POST /v1/regions/search (postgresql:// URL or an embedded "
                            "PostgreSQL folder; see docs/search.md)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="uvicorn's log level")
    serve.set_defaults(func=_cmd_serve)

    describe = subparsers.add_parser(
        "describe", help="describe regions of one image in-process (no server)",
        description="Describe each region of IMAGE with the model and print a table (or JSON). Masks: PNG files "
                    "(one region each) or JSON files holding a list of regions in any codec "
                    "(RLE, polygons, boxes, base64 PNG) or a SAM automatic-mask-generator list.",
        formatter_class=_DefaultsHelp)
    describe.add_argument("image", help="image file")
    describe.add_argument("--masks", nargs="+", required=True, metavar="FILE", help="PNG mask files or JSON region lists")
    describe.add_argument("--task", default="short",
                          help="short, detailed, category, open_vocab, refcocog, or a custom prompt containing <region>")
    describe.add_argument("--model", default=None, help="model folder (default: $OSPREY_MODEL or the installed default)")
    describe.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    describe.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                          help="weights' dtype (default: the folder's)")
    describe.add_argument("--max-tokens", type=int, default=64, help="new tokens per region")
    describe.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    describe.add_argument("--seed", type=int, default=None, help="sampling seed")
    describe.add_argument("--resize-masks", action="store_true",
                          help="resize masks of another size than the image (nearest) instead of refusing them")
    describe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    describe.add_argument("--overlay", default=None, metavar="OUT.png", help="write the image with masks and captions")
    describe.set_defaults(func=_cmd_describe)
    _register_annotate(subparsers)
    regions_cli.register(subparsers, _DefaultsHelp)  # osprey classify, osprey query
    index_cli.register(subparsers)


def _register_annotate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "annotate", help="caption or label every region of a dataset (COCO, SAM or PNG masks) into JSON lines",
        description="Describe every region of INPUT and append one JSON line per region to OUT (resumable: a rerun "
                    "skips regions already written). INPUT: a COCO instances or panoptic JSON (with --images DIR), "
                    "a folder of images with NAME.json SAM mask lists, or a folder of images with NAME/*.png masks. "
                    "See docs/annotate.md.")
    p.add_argument("input", help="COCO instances/panoptic JSON, or a folder of images with SAM JSON files or "
                                 "PNG mask folders")
    p.add_argument("--out", required=True, help="JSON lines output (appended; existing regions are skipped)")
    p.add_argument("--images", default=None, help="image folder of a COCO INPUT")
    p.add_argument("--panoptic-masks", default=None, metavar="DIR",
                   help="PNG folder of a COCO panoptic INPUT (default: the JSON's path without .json)")
    p.add_argument("--layout", default="auto", choices=["auto", "coco", "sam", "png"],
                   help="INPUT layout (auto: a file is COCO; a folder with *.json is SAM, else PNG masks)")
    p.add_argument("--task", default="short",
                   help="short, detailed, category, or a custom prompt containing <region>")
    p.add_argument("--coco", default=None, metavar="OUT.json",
                   help="also write the COCO INPUT back with each annotation's answer under 'osprey'")
    p.add_argument("--model", default=None, help="model folder (in-process and --ray; default: the built-in model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (in-process and --ray)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="region rows decoding at once in-process (continuous batching); on a GPU use 256")
    p.add_argument("--fast-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="in-process on CUDA: the engine's Triton decoding kernels and compiled layer pieces, each "
                        "checked against the reference at start-up (docs/engine.md); --no-fast-kernels: "
                        "FlashAttention and the eager layer modules")
    p.add_argument("--endpoint", default=None, metavar="URL[,URL...]", help="running `osprey serve` servers")
    p.add_argument("--api-key", default=None, help="bearer key of the servers")
    p.add_argument("--workers", type=int, default=None, help="images in flight over HTTP (default: 2 per URL)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a local Ray without ADDRESS, else the cluster at ADDRESS")
    p.add_argument("--actors", type=int, default=1,
                   help="model replicas under --ray (one GPU each on cuda, or see --actors-per-gpu)")
    p.add_argument("--actors-per-gpu", type=int, default=1,
                   help="--ray on cuda: replicas sharing one GPU (2: two replicas, each half a GPU in Ray's count)")
    p.add_argument("--images-per-call", type=int, default=8,
                   help="--ray: images per actor call; their regions decode together on that replica's engine")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images (a partial run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_annotate)


def _cmd_annotate(args: argparse.Namespace) -> int:
    from .annotate import run

    return run(args)


def _cmd_describe(args: argparse.Namespace) -> int:
    from .describe import run

    return run(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .config import ServeConfig, model_path_for

    model = model_path_for("serve", args.model)
    if model is None:
        return 2
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f"osprey serve: the server needs the serve extra ({exc}): pip install 'osprey-regions[serve]'",
              file=sys.stderr)
        return 2
    try:
        config = ServeConfig(
            model=model, served_model_name=args.served_model_name, devices=tuple(args.devices or [args.device or "cpu"]),
            dtype=args.dtype,
            cpu_threads=args.cpu_threads,
            api_key=args.api_key or None, allow_image_urls=args.allow_image_urls,
            max_batch_size=8 if args.max_batch_size is None else args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
            image_cache_size=args.image_cache_size, request_timeout_s=args.request_timeout,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
            max_regions=args.max_regions, max_tokens_limit=args.max_tokens_limit, kv_cache_gb=args.kv_cache_gb,
            max_row_tokens=args.max_row_tokens, fast_kernels=args.fast_kernels, clip_weights=args.clip_weights, index=args.index)
    except ValueError as exc:
        print(f"osprey serve: {exc}", file=sys.stderr)
        return 2
    try:
        from osprey.segment import SegmenterLoadError, Segmenters

        segmenters = Segmenters.load(args.sam, args.sam3, config.device)
    except SegmenterLoadError as exc:
        print(f"osprey serve: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", args.host)
    backend = _vllm_backend(args, config) if args.backend == "vllm" else None
    if args.backend == "vllm" and backend is None:
        return 2
    log.info("serving %s as %r on http://%s:%d (%s on %s)", model, config.model_name, args.host, args.port,
             args.backend, ", ".join(config.devices))
    log.info("playground: http://%s:%d/ui/", args.host, args.port)
    uvicorn.run(create_app(config, None if backend is None else [backend], segmenters=segmenters),
                host=args.host, port=args.port, fd=args.fd,
                log_level=args.log_level,
                timeout_graceful_shutdown=max(1, int(config.request_timeout_s)))
    if backend is not None:
        backend.shutdown()  # vLLM's engine processes
    return 0


def _vllm_backend(args: argparse.Namespace, config):
    """The vLLM backend for `osprey serve --backend vllm`, or None (with the reason printed) when vLLM is missing."""
    import importlib.util

    if len(config.devices) > 1:
        print("osprey serve: --devices runs engine replicas; --backend vllm spreads one model over GPUs with "
              "--tensor-parallel-size instead", file=sys.stderr)
        return None
    if importlib.util.find_spec("vllm") is None:
        print("osprey serve: --backend vllm needs vLLM (a CUDA GPU machine): pip install 'osprey-regions[vllm]' "
              "(offline GPU machines: bench/gpu_install.sh; docs/vllm.md)", file=sys.stderr)
        return None
    from .vllm_osprey.backend import VllmBackend, VllmSize

    try:
        size = VllmSize(gpu_memory_utilization=args.gpu_memory_utilization,
                        max_num_seqs=256 if args.max_batch_size is None else args.max_batch_size,
                        max_regions=config.max_regions, dtype=args.dtype or "bfloat16",
                        enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    except ValueError as exc:
        print(f"osprey serve: {exc}", file=sys.stderr)
        return None
    return VllmBackend(config.model, size)
