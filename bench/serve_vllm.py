"""The serving benchmark's vLLM systems: "vllm", the LLM half of the workload on vLLM's async engine, and
"vllm-osprey", the whole model (tower, extractor, LLM) on vLLM through our plugin (serve/vllm_osprey, docs/vllm.md).

vllm: each region becomes a token-id prompt of exactly our prompt's length: the image tokens are ids drawn per image
(so all regions of one image share that prefix and vLLM's prefix cache serves it), the `<mask><pos>` pair ids drawn
per region, the text ids as they are. Weights are random (`load_format="dummy"`) with the LLM's own config, EOS
ignored, greedy, prefix caching on. Installing vLLM on the GPU machine: bench/gpu_install.sh.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from bench.serve_workload import SHAPE_WARM_UP_SEED, Measurement, Workload, shape_warm_up
from osprey.inference import OspreyPipeline
from osprey.prompts import task_prompt

_ENGINE = None
_LOOP: asyncio.AbstractEventLoop | None = None  # vLLM's async engine stays bound to the loop it first ran in
_OSPREY = None  # the vllm-osprey backend (serve.vllm_osprey.backend.VllmBackend), started once
PLUGIN_NAME, PLUGIN_TARGET = "osprey", "serve.vllm_osprey:register"
LLM_HALF_MEMORY = 0.6  # the LLM-half engine's share of the GPU
STAMP = "random_weights.json"  # in a model folder written here: the preset and dtype of the seeded random weights


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_vllm(pipe: OspreyPipeline, workload: Workload, new_tokens: int) -> Measurement:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    engine = _LOOP.run_until_complete(_engine(pipe))
    m = Measurement("vllm", workload.masks_per_image, workload.images_in_flight, new_tokens)
    # the same warm-up as our engine's: one wave of this configuration with other image ids (nothing it caches is
    # reused by the timed run's prefixes)
    _LOOP.run_until_complete(_clients(engine, _prompts(pipe, shape_warm_up(workload), SHAPE_WARM_UP_SEED),
                                      new_tokens, Measurement("warm-up", 1, 1, new_tokens)))
    _LOOP.run_until_complete(_clients(engine, _prompts(pipe, workload, 0), new_tokens, m))
    return m


async def _engine(pipe: OspreyPipeline):
    """One vLLM engine for the whole run (its start-up, with CUDA graphs, takes minutes)."""
    global _ENGINE
    if _ENGINE is None:
        from vllm import AsyncLLMEngine

        _ENGINE = AsyncLLMEngine.from_engine_args(llm_half_engine_args(pipe, Path(tempfile.mkdtemp(prefix="vllm-llm-"))))
    return _ENGINE


def llm_half_engine_args(pipe: OspreyPipeline, folder: Path):
    """vLLM's engine arguments for the LLM half: `pipe`'s LLM config written to `folder` as a plain Llama, random
    weights. The context is 2,048 tokens (a region's prompt and answer fit) or the model's own maximum if smaller:
    vLLM refuses a longer one."""
    from vllm import AsyncEngineArgs

    lm_config = pipe.model.language_model.config.to_dict()
    lm_config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(lm_config))  # before the engine exists: nothing waits
    return AsyncEngineArgs(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                           enable_prefix_caching=True, gpu_memory_utilization=LLM_HALF_MEMORY,
                           max_model_len=min(2048, lm_config["max_position_embeddings"]), max_num_seqs=512)


def _prompts(pipe: OspreyPipeline, workload: Workload, seed: int) -> list[list[list[list[int]]]]:
    """Per client, per image, per region: the token ids (image and region ids drawn from `seed`, text ids real)."""
    ids = pipe._prompt_ids([("human", task_prompt("short"))]).tolist()
    config, vocab = pipe.config, pipe.config.vocab_size
    rng = np.random.default_rng(seed)
    out = []
    for client in workload.clients:
        images = []
        for request in client:
            image_ids = iter(rng.integers(3, vocab, config.vision.num_image_tokens).tolist())
            base = [next(image_ids) if t == config.image_token_id else t for t in ids]
            regions = []
            for _ in request.boxes:
                region_ids = rng.integers(3, vocab, 2).tolist()
                regions.append([region_ids[0] if t == config.mask_token_id else region_ids[1]
                                if t == config.pos_token_id else t for t in base])
            images.append(regions)
        out.append(images)
    return out


async def _clients(engine, prompts, new_tokens: int, m: Measurement) -> None:
    """All clients at once."""
    start = time.perf_counter()
    await asyncio.gather(*(_client(engine, images, new_tokens, m) for images in prompts))
    m.seconds = time.perf_counter() - start


async def _client(engine, images, new_tokens: int, m: Measurement) -> None:
    for regions in images:
        started = time.perf_counter()
        first: list[float] = []
        await asyncio.gather(*(_region(engine, ids, new_tokens, started, first, m) for ids in regions))
        m.request_latencies.append(time.perf_counter() - started)
        m.ttfts.append(min(first) - started)


async def _region(engine, ids: list[int], new_tokens: int, started: float, first: list[float], m: Measurement) -> None:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)
    async for output in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id=uuid.uuid4().hex):
        if not first:
            first.append(time.perf_counter())
        if output.finished:
            m.region_latencies.append(time.perf_counter() - started)


def shutdown_llm_half() -> None:
    """Stop the LLM-half engine (its process frees the GPU memory) before the full model's engine starts."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.shutdown()
        _ENGINE = None


# ---------------------------------------------------------------------------------------------- vllm-osprey


def ensure_plugin_entry_point(work: Path) -> str:
    """vLLM finds plugins through the `vllm.general_plugins` entry points of installed distributions, in every
    process it starts. From a source tree that is not pip-installed (the GPU machine runs the carried tree on
    PYTHONPATH), write a minimal dist-info declaring ours and put its folder on sys.path and PYTHONPATH (inherited by
    vLLM's processes). Returns where the entry point comes from."""
    from importlib.metadata import entry_points

    if any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins")):
        return "installed"
    site = work / "plugin_site"
    info = site / "osprey_regions_vllm_plugin-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: osprey-regions-vllm-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{PLUGIN_NAME} = {PLUGIN_TARGET}\n")
    repo = str(Path(__file__).resolve().parents[1])
    for path in (str(site), repo):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), repo, *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins")):
        raise RuntimeError(f"the plugin entry point written to {info} is not visible")
    return str(info)


def model_folder(pipe: OspreyPipeline, folder: Path, preset: str) -> Path:
    """A model folder holding `pipe`'s weights for vLLM to load (written once; a folder stamped with the same preset
    and dtype, written from the same seeded random weights, is reused)."""
    from osprey.checkpoint import save_pretrained

    dtype = str(pipe.model.dtype).removeprefix("torch.")
    if stamped(folder, preset, dtype):
        return folder
    save_pretrained(pipe.model, pipe.tokenizer, folder)
    (folder / STAMP).write_text(json.dumps({"preset": preset, "dtype": dtype}))
    return folder


def stamped(folder: Path, preset: str, dtype: str) -> bool:
    """Whether `folder` holds this preset's seeded random weights in `dtype` (written by `model_folder`)."""
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == {"preset": preset, "dtype": dtype}


def run_vllm_osprey(folder: Path, workload: Workload, new_tokens: int, gpu_memory_utilization: float = 0.6,
                    tensor_parallel: int = 1) -> Measurement:
    """The closed loop on the whole model on vLLM (one engine over `tensor_parallel` GPUs): each region a request
    (image + its one region), greedy, EOS ignored; all regions of an image sent together, the image's prefix shared
    through vLLM's prefix cache."""
    backend = _osprey_backend(folder, gpu_memory_utilization, tensor_parallel)
    m = Measurement("vllm-osprey", workload.masks_per_image, workload.images_in_flight, new_tokens,
                    tensor_parallel=tensor_parallel)
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, backend.loop).result()
    run(_osprey_clients(backend, shape_warm_up(workload), new_tokens, Measurement("warm-up", 1, 1, new_tokens)))
    run(_osprey_clients(backend, workload, new_tokens, m))
    return m


def _osprey_backend(folder: Path, gpu_memory_utilization: float, tensor_parallel: int):
    """The vllm-osprey backend, started once per tensor-parallel size (the engine of another size is stopped first:
    its processes free their GPUs)."""
    global _OSPREY
    if _OSPREY is not None and _OSPREY.size.tensor_parallel_size != tensor_parallel:
        _OSPREY.shutdown()
        _OSPREY = None
    if _OSPREY is None:
        from serve.vllm_osprey.backend import VllmBackend, VllmSize

        ensure_plugin_entry_point(folder.parent)
        _OSPREY = VllmBackend(str(folder), VllmSize(gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=512,
                                                    max_regions=64, tensor_parallel_size=tensor_parallel))
        _OSPREY.load()
    return _OSPREY


async def _osprey_clients(backend, workload: Workload, new_tokens: int, m: Measurement) -> None:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)
    start = time.perf_counter()
    await asyncio.gather(*(_osprey_client(backend, requests, params, m) for requests in workload.clients))
    m.seconds = time.perf_counter() - start


async def _osprey_client(backend, requests, params, m: Measurement) -> None:
    for request in requests:
        started = time.perf_counter()
        first: list[float] = []
        prompts = backend.prepare_each(backend.encode_image(request.image), [("human", task_prompt("short"))],
                                       request.masks)
        await asyncio.gather(*(_osprey_region(backend, p, params, started, first, m) for p in prompts))
        m.request_latencies.append(time.perf_counter() - started)
        m.ttfts.append(min(first) - started)


async def _osprey_region(backend, prompt, params, started: float, first: list[float], m: Measurement) -> None:
    async for output in backend.engine.generate(backend.tokens_prompt(prompt), params, request_id=uuid.uuid4().hex):
        if not first:
            first.append(time.perf_counter())
        if output.finished:
            m.region_latencies.append(time.perf_counter() - started)
