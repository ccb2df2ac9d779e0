"""`osprey serve --backend vllm`: the server's `Backend` on vLLM's async engine (the whole model runs in vLLM).

The server's engine (serve/engine.py) drives a backend step by step from its worker thread; vLLM's `AsyncLLM`
runs requests as coroutines and streams their tokens. This adapter keeps vLLM on its own event loop in a thread:
`add` starts one `generate` coroutine per row, whose token deltas land in a queue; `step` waits briefly for that
queue and turns the tokens into text with our `TextStream` (the same detokenization and stop strings as our
engine, since vLLM runs without a tokenizer: our prompts carry the official tokenization's ids); `cancel` cancels
the row's coroutine, which aborts the vLLM request. Prompts are prepared here, before vLLM sees them, with the
checks and errors of our pipeline (region count, mask size, context length), so the HTTP API answers the same 4xx.
vLLM is imported in `load` only (the rest is tested without it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from osprey.checkpoint import read_config
from osprey.engine.session import StreamEvent
from osprey.engine.text import TextStream
from osprey.generation import SamplingParams
from osprey.preprocess import as_rgb, masks_to_tensor
from osprey.tokenization import load_tokenizer

from ..errors import APIError
from .prompts import (
    IMAGE_MODALITY,
    REGION_MODALITY,
    check_region_count,
    expanded_length,
    generation_prompt_ids,
    image_content_key,
    region_items,
    stamp_content_id,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSize:
    """vLLM engine settings `osprey serve --backend vllm` exposes (the rest are vLLM's defaults)."""

    gpu_memory_utilization: float = 0.85  # share of the GPU vLLM may take (weights, KV cache, activations)
    max_num_seqs: int = 256  # region rows decoded together (vLLM's running batch)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_regions: int = 64  # regions per prompt (vLLM's --limit-mm-per-prompt for "region")
    dtype: str = "bfloat16"
    enforce_eager: bool = False  # True: no CUDA graphs / compilation (faster start, slower decoding)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "max_regions", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class VllmImage:
    """An image ready for vLLM: RGB, named by its content (the key also stamps it for vLLM's hasher)."""

    image: Image.Image
    key: bytes

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def width(self) -> int:
        return self.image.width


@dataclass(frozen=True)
class VllmPrompt:
    """One row for vLLM: ids with one image placeholder and a `<mask><pos>` pair per mask, and the masks."""

    token_ids: list[int]
    image: VllmImage
    masks: np.ndarray  # (Q, H, W) bool, bound to the pairs in order
    num_tokens: int  # the expanded prompt's length (as our engine counts prompt tokens)


@dataclass
class _Delta:
    """New tokens of a row from its vLLM coroutine (or its end)."""

    row_id: int
    tokens: list[int]
    finish_reason: str | None = None  # vLLM's: "stop" | "length" | "abort" | None (more to come)
    error: str | None = None


@dataclass
class _Row:
    stream: TextStream
    task: asyncio.Future | None = None
    done: bool = False
    tokens: int = 0


class VllmBackend:
    """`serve.engine.Backend` on vLLM's AsyncLLM (see the module docstring)."""

    def __init__(self, model: str, size: VllmSize = VllmSize()) -> None:
        self.model, self.size = model, size
        self.config = read_config(model)
        self.tokenizer = load_tokenizer(model)
        self.eos_token_id = self.tokenizer.eos_token_id
        self._events: queue.Queue[_Delta] = queue.Queue()
        self._rows: dict[int, _Row] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def load(self) -> None:
        from . import register

        register()  # this process runs vLLM's input processing; its engine processes load the plugin themselves
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True).start()
        self._engine = asyncio.run_coroutine_threadsafe(self._start_engine(), self._loop).result()
        log.info("vLLM engine ready on %s", self.model)

    async def _start_engine(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(self.engine_args())

    def engine_args(self):
        """vLLM's AsyncEngineArgs for this backend: our prompts' ids (no vLLM tokenizer), prefix caching, the sizes."""
        from vllm import AsyncEngineArgs

        return AsyncEngineArgs(
            model=self.model, skip_tokenizer_init=True, dtype=self.size.dtype, enable_prefix_caching=True,
            gpu_memory_utilization=self.size.gpu_memory_utilization, max_num_seqs=self.size.max_num_seqs,
            max_model_len=self.max_context_tokens(), enforce_eager=self.size.enforce_eager,
            tensor_parallel_size=self.size.tensor_parallel_size,
            limit_mm_per_prompt={IMAGE_MODALITY: 1, REGION_MODALITY: self.size.max_regions})

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    # -- prompts (no vLLM needed) ----------------------------------------------------------------------------------
    def scorer(self):
        """Likelihood scoring (/v1/regions/classify, /query) reads the model's logits over whole answers, which vLLM's
        engine does not expose per position here: those routes need the in-process engine."""
        raise APIError(404, "likelihood scoring (/v1/regions/classify, /v1/regions/query) runs on the in-process "
                            "engine; start the server without --backend vllm", param=None, code="scoring_not_available")

    def encode_image(self, image: Image.Image) -> VllmImage:
        """The image itself: vLLM encodes it (once per content, through its encoder and prefix caches)."""
        rgb = as_rgb(image)
        key = image_content_key(rgb)
        stamp_content_id(rgb, key)
        return VllmImage(rgb, key)

    def encode_images(self, images: list[Image.Image]) -> list[VllmImage]:
        return [self.encode_image(image) for image in images]

    def prepare(self, encoded: VllmImage, turns: list[tuple[str, str | None]], masks: np.ndarray) -> VllmPrompt:
        ids = generation_prompt_ids(self.tokenizer, self.config, turns)
        stack = masks_to_tensor(masks, encoded.height, encoded.width).numpy()
        check_region_count(ids, self.config, stack.shape[0])
        return VllmPrompt(ids, encoded, stack, expanded_length(ids, self.config))

    def prepare_each(self, encoded: VllmImage, turns: list[tuple[str, str | None]], masks: np.ndarray
                     ) -> list[VllmPrompt]:
        ids = generation_prompt_ids(self.tokenizer, self.config, turns)
        check_region_count(ids, self.config, 1)
        stack = masks_to_tensor(masks, encoded.height, encoded.width).numpy()
        length = expanded_length(ids, self.config)
        return [VllmPrompt(ids, encoded, stack[i:i + 1], length) for i in range(stack.shape[0])]

    def max_context_tokens(self) -> int | None:
        limit = self.size.max_model_len or self.config.text.get("max_position_embeddings")
        return None if limit is None else int(limit)

    # -- rows --------------------------------------------------------------------------------------------------------
    def add(self, rows: Sequence) -> None:
        """Start each row's vLLM request (`rows`: serve.engine.EngineRow of VllmPrompt)."""
        limit = self.max_context_tokens()
        for row in rows:
            wanted = row.prepared.num_tokens + row.params.max_new_tokens
            if limit is not None and wanted > limit:
                raise ValueError(f"{row.prepared.num_tokens} prompt + {row.params.max_new_tokens} new tokens exceed "
                                 f"vLLM's max_model_len {limit}")
        for row in rows:
            state = _Row(TextStream(self.tokenizer, row.params.stop))
            self._rows[row.row_id] = state
            state.task = asyncio.run_coroutine_threadsafe(
                self._generate(row.row_id, row.prepared, row.params), self._loop)

    def tokens_prompt(self, prompt: VllmPrompt):
        """A prepared prompt as vLLM's TokensPrompt: the ids, the image and its regions (each bound to the image)."""
        from vllm import TokensPrompt

        return TokensPrompt(
            prompt_token_ids=prompt.token_ids,
            multi_modal_data={IMAGE_MODALITY: prompt.image.image,
                              REGION_MODALITY: region_items(prompt.image.image, prompt.masks)})

    @property
    def engine(self):
        """vLLM's AsyncLLM (after `load`); its coroutines run on `loop`."""
        return self._engine

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    async def _generate(self, row_id: int, prompt: VllmPrompt, params: SamplingParams) -> None:
        request = self.tokens_prompt(prompt)
        try:
            async for output in self._engine.generate(request, self.sampling_params(params),
                                                      request_id=f"osprey-row-{row_id}"):
                completion = output.outputs[0]
                self._events.put(_Delta(row_id, list(completion.token_ids), completion.finish_reason))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported on the row (a 500 for its request), the engine goes on
            log.exception("vLLM request of row %d failed", row_id)
            self._events.put(_Delta(row_id, [], "error", error=f"{type(exc).__name__}: {exc}"))

    def sampling_params(self, params: SamplingParams):
        """Ours -> vLLM's: token deltas, EOS as the stop token, stop strings left to our TextStream."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            stop_token_ids=[] if self.eos_token_id is None else [self.eos_token_id],
            ignore_eos=self.eos_token_id is None, detokenize=False, output_kind=RequestOutputKind.DELTA)

    def cancel(self, row_id: int) -> None:
        state = self._rows.pop(row_id, None)
        if state is not None and state.task is not None:
            state.task.cancel()  # the coroutine's CancelledError makes AsyncLLM abort the request

    def step(self) -> list[StreamEvent]:
        """Every token that arrived (waiting up to 20 ms for the first), as our engine's stream events."""
        try:
            deltas = [self._events.get(timeout=0.02)]
        except queue.Empty:
            return []
        while True:
            try:
                deltas.append(self._events.get_nowait())
            except queue.Empty:
                break
        return [event for delta in deltas for event in self._to_events(delta)]

    def _to_events(self, delta: _Delta) -> list[StreamEvent]:
        state = self._rows.get(delta.row_id)
        if state is None:  # cancelled meanwhile
            return []
        events = []
        tokens = delta.tokens
        if delta.finish_reason == "stop" and tokens and tokens[-1] == self.eos_token_id:
            tokens = tokens[:-1]  # EOS ends the row and is no text (our engine emits no token for it either)
        for token in tokens:
            text = state.stream.push(token)
            state.tokens += 1
            if state.stream.stopped:
                self.cancel(delta.row_id)
                return [*events, StreamEvent(delta.row_id, text, token, True, "stop")]
            events.append(StreamEvent(delta.row_id, text, token, False, None))
        if delta.finish_reason is not None:
            self._rows.pop(delta.row_id, None)
            reason = {"abort": "cancelled"}.get(delta.finish_reason, delta.finish_reason)
            tail = state.stream.flush() if reason != "error" else ""
            if delta.error:
                log.error("row %d: %s", delta.row_id, delta.error)
            if events and reason != "error":
                last = events.pop()
                events.append(StreamEvent(last.row, last.text_delta + tail, last.token_id, True, reason))
            else:
                events.append(StreamEvent(delta.row_id, tail, None, True, reason))
        return events

    @property
    def has_work(self) -> bool:
        return bool(self._rows) or not self._events.empty()

    @property
    def live_rows(self) -> int:
        return len(self._rows)
