"""The serving benchmark's vLLM baseline: the LLM half of the same workload on vLLM's async engine.

Each region becomes a token-id prompt of exactly our prompt's length: the image tokens are ids drawn per image
(so all regions of one image share that prefix and vLLM's prefix cache serves it), the `<mask><pos>` pair ids drawn
per region, the text ids as they are. Weights are random (`load_format="dummy"`) with the LLM's own config, EOS
ignored, greedy, prefix caching on. Installing vLLM on the GPU machine: bench/gpu_install.sh.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from bench.serve_workload import Measurement, Workload
from osprey.inference import OspreyPipeline
from osprey.prompts import task_prompt

_ENGINE = None
_LOOP: asyncio.AbstractEventLoop | None = None  # vLLM's async engine stays bound to the loop it first ran in


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def run_vllm(pipe: OspreyPipeline, workload: Workload, new_tokens: int) -> Measurement:
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    engine = _LOOP.run_until_complete(_engine(pipe))
    prompts = _prompts(pipe, workload)
    m = Measurement("vllm", workload.masks_per_image, workload.images_in_flight, new_tokens)
    _LOOP.run_until_complete(_clients(engine, prompts, [[[1, 2, 3]]], new_tokens, None))  # warm-up
    _LOOP.run_until_complete(_clients(engine, prompts, None, new_tokens, m))
    return m


async def _engine(pipe: OspreyPipeline):
    """One vLLM engine for the whole run (its start-up, with CUDA graphs, takes minutes)."""
    global _ENGINE
    if _ENGINE is None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        folder = tempfile.mkdtemp(prefix="vllm-llm-")
        lm_config = pipe.model.language_model.config.to_dict()
        lm_config["architectures"] = ["LlamaForCausalLM"]
        Path(folder, "config.json").write_text(json.dumps(lm_config))  # before the engine exists: nothing waits
        args = AsyncEngineArgs(model=folder, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                               enable_prefix_caching=True, gpu_memory_utilization=0.6, max_model_len=2048,
                               max_num_seqs=512)
        _ENGINE = AsyncLLMEngine.from_engine_args(args)
    return _ENGINE


def _prompts(pipe: OspreyPipeline, workload: Workload) -> list[list[list[list[int]]]]:
    """Per client, per image, per region: the token ids (image and region ids drawn, text ids real)."""
    ids = pipe._prompt_ids([("human", task_prompt("short"))]).tolist()
    config, vocab = pipe.config, pipe.config.vocab_size
    rng = np.random.default_rng(0)
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


async def _clients(engine, prompts, warm_up, new_tokens: int, m: Measurement | None) -> None:
    """All clients at once; with `warm_up` (one tiny prompt) instead, just that prompt, unmeasured."""
    m = m or Measurement("warm-up", 1, 1, new_tokens)
    start = time.perf_counter()
    await asyncio.gather(*(_client(engine, images, new_tokens, m) for images in (warm_up and [warm_up] or prompts)))
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
