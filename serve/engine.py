"""The engine between HTTP and the model: a bounded queue, one worker thread, dynamic batching, cancellation.

Requests become `Job`s (one image, one or more prompt rows). The worker thread owns the model: it encodes
each job's image once (LRU cache by content hash, so requests for the same image share it), prepares the
rows, and decodes rows of several jobs together, up to `max_batch_size` prompts, waiting `batch_wait_ms`
to fill a batch. Events (text deltas, finished rows, errors) flow back to the event loop thread-safely.
A cancelled job (client gone, timeout) is dropped from the queue; a batch whose live rows are all
cancelled stops decoding.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import APIError
from .metrics import Metrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """What the engine needs from a model runtime (the in-process pipeline now; a vLLM one later)."""

    def load(self) -> None: ...

    def encode_image(self, image: Image.Image) -> Any: ...

    def prepare(self, encoded: Any, turns: list[tuple[str, str | None]], masks: np.ndarray) -> Any:
        """-> a prepared prompt; raises ValueError naming the problem (count mismatch, mask size, length)."""

    def prompt_tokens(self, prepared: Any) -> int: ...

    def max_context_tokens(self) -> int | None:
        """Prompt + generated tokens the model can attend over (None = no limit known)."""

    def generate_stream(self, prepared: Sequence[Any], params: Sequence[Any],
                        cancelled: Callable[[int], bool]) -> Iterator[list[Any]]:
        """Per decoding step, a list of events with `row, text_delta, token_id, finished, finish_reason`;
        `cancelled(row)` is polled each step and a cancelled row stops (finish_reason "cancelled")."""


class PipelineBackend:
    """`osprey.inference.OspreyPipeline` in this process (the default backend).

    On CPU, torch's intra-op pool gets `cpu_threads` threads (default: all cores but one). With every core
    given to OpenMP, its spinning threads starve the event loop and any other process: on the 2-core dev
    machine under load that made decoding up to 10x slower and p90 latency ~20x worse (docs/serve.md).
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, cpu_threads: int | None = None
                 ) -> None:
        self.model, self.device, self.dtype, self.cpu_threads = model, device, dtype, cpu_threads
        self.pipe: Any = None

    def load(self) -> None:
        import torch

        from osprey.inference import OspreyPipeline

        if self.device.startswith("cpu"):
            threads = self.cpu_threads or max(1, len(os.sched_getaffinity(0)) - 1)
            torch.set_num_threads(threads)
            log.info("CPU decoding with %d torch threads", threads)
        self.pipe = OspreyPipeline.from_pretrained(self.model, device=self.device, dtype=self.dtype)

    def encode_image(self, image: Image.Image) -> Any:
        return self.pipe.encode_image(image)

    def prepare(self, encoded: Any, turns: list[tuple[str, str | None]], masks: np.ndarray) -> Any:
        return self.pipe.prepare(encoded, turns, masks)

    def prompt_tokens(self, prepared: Any) -> int:
        return int(prepared.num_tokens)

    def max_context_tokens(self) -> int | None:
        limit = self.pipe.config.text.get("max_position_embeddings")
        return None if limit is None else int(limit)

    def generate_stream(self, prepared: Sequence[Any], params: Sequence[Any],
                        cancelled: Callable[[int], bool]) -> Iterator[list[Any]]:
        return self.pipe.generate_stream(list(prepared), list(params), cancelled=cancelled)


# ---------------------------------------------------------------------------------------------- jobs


@dataclass
class RowSpec:
    """One prompt: `turns` (human/gpt, ending with the human turn to answer), `masks: (Q, H, W) bool` bound
    to the `<mask><pos>` pairs in order, and sampling params."""

    index: int
    turns: list[tuple[str, str | None]]
    masks: np.ndarray
    params: Any


@dataclass
class RowResult:
    index: int
    raw_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(eq=False)  # identity semantics: jobs live in a set
class Job:
    image: Image.Image
    image_key: str
    rows: list[RowSpec]
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def emit(self, event: tuple) -> None:
        if not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
                self.cancelled.set()

    def fail(self, error: APIError) -> None:
        self.emit(("error", error))


@dataclass
class _Live:
    """A row in the worker: its job, prepared prompt and what it has generated so far."""

    job: Job
    spec: RowSpec
    prepared: Any
    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    done: bool = False


_STOP = object()


class ClientGone(Exception):
    """The client disconnected; its job has been cancelled."""


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    def __init__(self, backend: Backend, metrics: Metrics, *, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 max_queue: int = 64, image_cache_size: int = 16) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = image_cache_size
        self._thread = threading.Thread(target=self._main, name="osprey-engine", daemon=True)
        self._inflight: set[Job] = set()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.closing = False

    # ------------------------------------------------------------------ lifecycle (event-loop side)

    def start(self) -> None:
        self._thread.start()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, let in-flight requests finish (up to `timeout_s`), then stop the worker."""
        self.closing = True
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self._inflight):
            job.cancelled.set()
        while True:
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                self._drop_one_queued()
        await asyncio.to_thread(self._thread.join, 10.0)

    def _drop_one_queued(self) -> None:
        try:
            self._queue.get_nowait()
        except queue.Empty:
            pass

    # ------------------------------------------------------------------ requests (event-loop side)

    def submit(self, image: Image.Image, image_key: str, rows: list[RowSpec], timeout_s: float) -> Job:
        """Admit a job or raise APIError: 503 while loading / shutting down, 429 when the queue is full."""
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        job = Job(image=image, image_key=image_key, rows=rows, loop=asyncio.get_running_loop(),
                  deadline=time.monotonic() + timeout_s)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, "the server is busy: too many queued requests; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self._inflight.add(job)
        self.metrics.set("queue_depth", self._queue.qsize())
        return job

    async def events(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[tuple]:
        """Yield the job's ("delta", row, text) and ("done", row, RowResult) events until every row is done.

        Raises APIError (from the worker, or 504 on timeout) and ClientGone; the job is cancelled then.
        """
        remaining = len(job.rows)
        try:
            while remaining:
                wait = min(0.5, job.deadline - time.monotonic())
                if wait <= 0:
                    raise APIError(504, "the request timed out before generation finished", code="timeout")
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        raise ClientGone() from None
                    continue
                if event[0] == "error":
                    raise event[1]
                if event[0] == "done":
                    remaining -= 1
                yield event
        finally:
            if remaining:
                job.cancelled.set()
            self._inflight.discard(job)

    # ------------------------------------------------------------------ worker thread

    def _main(self) -> None:
        try:
            self.backend.load()
        except Exception as exc:  # report on /health and to every request instead of dying silently
            log.exception("model failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.ready.set()
        self.metrics.set("model_loaded", 1)
        log.info("model loaded; engine ready (max batch %d)", self.max_batch_size)
        pending: collections.deque[_Live] = collections.deque()
        stopping = False
        while not (stopping and not pending):
            if not pending:
                item = self._queue.get()
                if item is _STOP:
                    break
                self._admit(item, pending)
            stopping = self._fill(pending) or stopping
            self.metrics.set("queue_depth", self._queue.qsize())
            batch: list[_Live] = []
            while pending and len(batch) < self.max_batch_size:
                live = pending.popleft()
                if not live.job.cancelled.is_set():
                    batch.append(live)
            if batch:
                self._decode(batch)
        log.info("engine stopped")

    def _fill(self, pending: collections.deque[_Live]) -> bool:
        """Take more queued jobs for up to batch_wait while the batch has room; True when told to stop."""
        deadline = time.monotonic() + self.batch_wait_s
        while len(pending) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            self._admit(item, pending)
        return False

    def _admit(self, job: Job, pending: collections.deque[_Live]) -> None:
        """Encode the image (cached) and prepare the job's rows; errors go to that job only."""
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.fail(APIError(504, "the request timed out in the queue", code="timeout"))
            return
        try:
            encoded = self._encode(job)
            rows = []
            for spec in job.rows:
                prepared = self.backend.prepare(encoded, spec.turns, spec.masks)
                rows.append(_Live(job, spec, prepared, self.backend.prompt_tokens(prepared)))
                self._check_context(rows[-1])
        except APIError as exc:
            job.fail(exc)
            return
        except ValueError as exc:
            job.fail(APIError(400, f"invalid prompt: {exc}", param="messages", code="invalid_prompt"))
            return
        except Exception as exc:
            log.exception("preparing a request failed")
            job.fail(APIError(500, f"internal error while preparing the prompt ({type(exc).__name__})",
                              code="internal_error"))
            return
        pending.extend(rows)

    def _check_context(self, live: _Live) -> None:
        limit = self.backend.max_context_tokens()
        wanted = live.prompt_tokens + live.spec.params.max_new_tokens
        if limit is not None and wanted > limit:
            raise APIError(400, f"the prompt has {live.prompt_tokens} tokens and {live.spec.params.max_new_tokens} "
                                f"more were asked for, but the model's context is {limit} tokens; shorten the "
                                "conversation or lower max_tokens", param="messages", code="context_length_exceeded")

    def _encode(self, job: Job) -> Any:
        encoded = self._cache.get(job.image_key)
        if encoded is not None:
            self._cache.move_to_end(job.image_key)
            self.metrics.inc("image_cache", result="hit")
            return encoded
        self.metrics.inc("image_cache", result="miss")
        image = job.image if job.image.mode == "RGB" else job.image.convert("RGB")
        encoded = self.backend.encode_image(image)
        self._cache[job.image_key] = encoded
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return encoded

    def _decode(self, batch: list[_Live]) -> None:
        started = time.perf_counter()
        self.metrics.set("running", len(batch))
        self.metrics.inc("prompt_tokens", sum(live.prompt_tokens for live in batch))
        stream = self.backend.generate_stream([live.prepared for live in batch], [live.spec.params for live in batch],
                                              lambda row: batch[row].job.cancelled.is_set())
        try:
            for step in stream:
                for event in step:
                    self._on_event(batch[event.row], event)
                if all(live.done or live.job.cancelled.is_set() for live in batch):
                    break
        except Exception as exc:
            log.exception("generation failed")
            for live in batch:
                if not live.done:
                    live.job.fail(APIError(500, f"generation failed ({type(exc).__name__})", code="internal_error"))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            self.metrics.set("running", 0)
            self.metrics.batch_done(len(batch), sum(live.tokens for live in batch), time.perf_counter() - started)

    def _on_event(self, live: _Live, event: Any) -> None:
        if live.done:
            return
        if event.token_id is not None:
            live.tokens += 1
        if event.text_delta:
            live.text.append(event.text_delta)
            if live.job.first_token is None:
                live.job.first_token = time.perf_counter()
                self.metrics.observe("ttft", live.job.first_token - live.job.submitted)
            live.job.emit(("delta", live.spec.index, event.text_delta))
        if event.finished:
            live.done = True
            live.job.emit(("done", live.spec.index, RowResult(
                index=live.spec.index, raw_text="".join(live.text), prompt_tokens=live.prompt_tokens,
                completion_tokens=live.tokens, finish_reason=event.finish_reason or "stop")))
