"""The engine between HTTP and the model: a bounded queue, one worker thread, continuous batching, cancellation.

Requests become `Job`s (one image, one or more prompt rows). The worker thread owns the model: it encodes each
job's image once (LRU cache by content hash, so requests for the same image share it), prepares the rows and hands
them to the backend's decoder, which runs rows of many jobs together: a job's rows join between two decoding steps
and leave as each finishes, so a long answer never holds a short one back. Events (text deltas, finished rows,
errors) flow back to the event loop thread-safely. A cancelled job (client gone, timeout) frees its rows' slots at
the next step. One-shot work that generates nothing (likelihood scoring: classify, query) comes as a `Task`,
run by the same thread between two steps with the image from the same cache (`Engine.submit_task`). A server on
several devices runs one `Engine` per device (serve.replicas dispatches between them); `replica` labels its metrics.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from osprey.engine.session import DecodeSession, StreamEvent
from osprey.generation import SamplingParams
from osprey.inference import EncodedImage, OspreyPipeline, PreparedPrompt
from osprey.preprocess import as_rgb
from osprey.scoring import AnswerScorer

from .errors import APIError
from .metrics import Metrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- backends


class Prepared(Protocol):
    """A backend's prepared prompt, as the engine sees it (the backend alone reads the rest)."""

    @property
    def num_tokens(self) -> int: ...


@dataclass(frozen=True)
class EngineRow:
    """One prompt handed to a backend: `row_id` names it in the backend's events."""

    row_id: int
    prepared: Prepared  # what the same backend's prepare / prepare_each returned
    params: SamplingParams


class Backend(Protocol):
    """What the engine needs from a model runtime: the in-process pipeline (`PipelineBackend`) or vLLM
    (`serve.vllm_osprey.backend.VllmBackend`). The encoded image and the prepared prompt are the backend's own types:
    the engine caches the one and hands the other back to `add`. A row finishing with reason "error" fails its
    request (500); the others go on."""

    def load(self) -> None: ...

    def encode_images(self, images: list[Image.Image]) -> list[object]:
        """RGB images -> the backend's encoded images, in order (the images admitted together: one vision pass)."""

    def prepare(self, encoded: object, turns: list[tuple[str, str | None]], masks: np.ndarray) -> Prepared:
        """-> a prepared prompt; raises ValueError naming the problem (count mismatch, mask size, length)."""

    def prepare_each(self, encoded: object, turns: list[tuple[str, str | None]], masks: np.ndarray
                     ) -> list[Prepared]:
        """One single-region prompt per mask (the same `turns`), prepared together."""

    def max_context_tokens(self) -> int | None:
        """Prompt + generated tokens the model can attend over (None = no limit known)."""

    def add(self, rows: list[EngineRow]) -> None:
        """Start decoding rows (they join the running batch); raises ValueError when one cannot fit."""

    def cancel(self, row_id: int) -> None:
        """Stop a row; no more events come for it."""

    def step(self) -> list[StreamEvent]:
        """One round of work (admitting rows or one token for every live row): the rows' events."""

    def scorer(self) -> AnswerScorer:
        """Likelihood scoring of given answers (classification, queries) on this backend's model."""

    @property
    def has_work(self) -> bool: ...

    @property
    def live_rows(self) -> int: ...


@dataclass(frozen=True)
class EngineSize:
    """How much the in-process engine holds: region rows in flight and the KV memory behind them."""

    max_rows: int = 8  # region rows decoded together (across requests)
    kv_cache_gb: float | None = None  # KV memory; None: 90% of the GPU memory left after loading, 1 GiB on CPU
    max_row_tokens: int = 1280  # per row: its own prompt tokens (after the image prefix) + generated tokens
    rows_per_image: int = 16  # how the KV memory is split between image prefixes and rows
    fast_kernels: bool = True  # CUDA: the Triton decoding kernels and compiled layers (docs/engine.md)


class PipelineBackend:
    """`osprey.inference.OspreyPipeline` in this process (the default backend), decoding with `osprey.engine`.

    On CPU, torch's intra-op pool gets `cpu_threads` threads (default: all cores but one). With every core
    given to OpenMP, its spinning threads starve the event loop and any other process: on the 2-core dev
    machine under load that made decoding up to 10x slower and p90 latency ~20x worse (docs/serve.md).
    """

    def __init__(self, model: str, device: str = "cpu", dtype: str | None = None, cpu_threads: int | None = None,
                 size: EngineSize = EngineSize(), pipeline: OspreyPipeline | None = None) -> None:
        """`pipeline`: an already built pipeline to serve (benchmarks with random weights); else `model` is loaded."""
        self.model, self.device, self.dtype, self.cpu_threads, self.size = model, device, dtype, cpu_threads, size
        self.pipe: OspreyPipeline | None = pipeline
        self.session: DecodeSession | None = None
        self._scorer: AnswerScorer | None = None

    def load(self) -> None:
        """Runs on the engine's worker thread, which then owns this device: CUDA's current device is per thread,
        and CUDA graphs and Triton kernels launch on it, so a replica on cuda:1 makes it the thread's own."""
        import torch

        device = torch.device(self.device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        if device.type == "cpu":
            threads = self.cpu_threads or max(1, len(os.sched_getaffinity(0)) - 1)
            torch.set_num_threads(threads)
            log.info("CPU decoding with %d torch threads", threads)
        if self.pipe is None:
            self.pipe = OspreyPipeline.from_pretrained(self.model, device=self.device, dtype=self.dtype)
        pool = self.pipe.engine_pool(self.size.max_rows, self.size.max_row_tokens, self.size.kv_cache_gb,
                                     self.size.rows_per_image)
        self.session = self.pipe.session(pool, fast_kernels=self.size.fast_kernels)
        log.info("engine pool on %s: %d images x %d prefix tokens, %d rows x %d tokens", self.device,
                 pool.prefix_slots, pool.prefix_tokens, pool.row_slots, pool.suffix_tokens)

    def encode_images(self, images: list[Image.Image]) -> list[EncodedImage]:
        return self.pipe.encode_images(images)

    def prepare(self, encoded: EncodedImage, turns: list[tuple[str, str | None]], masks: np.ndarray) -> PreparedPrompt:
        return self.pipe.prepare(encoded, turns, masks)

    def prepare_each(self, encoded: EncodedImage, turns: list[tuple[str, str | None]], masks: np.ndarray
                     ) -> list[PreparedPrompt]:
        return self.pipe.prepare_each(encoded, turns, masks)

    def max_context_tokens(self) -> int | None:
        limit = self.pipe.config.text.get("max_position_embeddings")
        return None if limit is None else int(limit)

    def add(self, rows: list[EngineRow]) -> None:
        groups = self.pipe.group_requests([r.prepared for r in rows], [r.params for r in rows],
                                          row_ids=[r.row_id for r in rows])
        self.session.add(groups)

    def cancel(self, row_id: int) -> None:
        self.session.cancel(row_id)

    def step(self) -> list[StreamEvent]:
        return self.session.step()

    def scorer(self) -> AnswerScorer:
        if self._scorer is None:
            self._scorer = AnswerScorer(self.pipe)
        return self._scorer

    @property
    def has_work(self) -> bool:
        return self.session is not None and self.session.has_work

    @property
    def live_rows(self) -> int:
        return 0 if self.session is None else self.session.live_rows


# ---------------------------------------------------------------------------------------------- jobs


@dataclass
class RowSpec:
    """One prompt: `turns` (human/gpt, ending with the human turn to answer), `masks: (Q, H, W) bool` bound
    to the `<mask><pos>` pairs in order, and sampling params."""

    index: int
    turns: list[tuple[str, str | None]]
    masks: np.ndarray
    params: SamplingParams


@dataclass
class RowResult:
    index: int
    raw_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class RowText:
    """New text of row `index` of a job."""

    index: int
    text: str


@dataclass(frozen=True)
class RowDone:
    """Row `result.index` of a job is finished."""

    result: RowResult


@dataclass(frozen=True)
class JobFailed:
    """The job failed (bad prompt, generation error, timeout): `Engine.events` raises `error`."""

    error: APIError


JobEvent = RowText | RowDone | JobFailed


@dataclass(eq=False)  # identity semantics: jobs live in a set
class Job:
    image: Image.Image
    image_key: str
    rows: list[RowSpec]
    loop: asyncio.AbstractEventLoop
    deadline: float
    # batches of events (list[JobEvent]): all of a decoding step's events for this job cross to the event loop as one
    # item, so a step costs one thread hop per job, not one per region and token (256 rows: ~16k hops a wave)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    replica: int = 0  # the engine replica that runs it (serve.replicas: its events come from that engine)

    def emit(self, *events: JobEvent) -> None:
        """Hand these events, as one batch, to the event loop that waits for them (from the worker thread)."""
        if events and not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, list(events))
            except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
                self.cancelled.set()

    def fail(self, error: APIError) -> None:
        self.emit(JobFailed(error))

    def abandoned(self, now: float) -> bool:
        """Nobody waits for it any more (cancelled, or past its deadline)."""
        return self.cancelled.is_set() or now > self.deadline


@dataclass(eq=False)
class Task:
    """One-shot work on the model (likelihood scoring), run by the worker between two decoding steps: `work`
    gets the backend and the image, encoded (or taken from the image cache); its result or APIError resolves
    `future`."""

    image: Image.Image
    image_key: str
    work: Callable[[Backend, EncodedImage], Any]
    loop: asyncio.AbstractEventLoop
    deadline: float
    future: asyncio.Future
    replica: int = 0  # the engine replica that runs it

    def abandoned(self, now: float) -> bool:
        """Nobody waits for it any more (past its deadline, or its request gave up)."""
        return now > self.deadline or self.future.done()

    def resolve(self, result: Any = None, error: APIError | None = None) -> None:
        def settle() -> None:
            if self.future.done():  # the awaiting request gave up (timeout, client gone)
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass


@dataclass
class _Live:
    """A row in the worker: its job, prepared prompt and what it has generated so far."""

    job: Job
    spec: RowSpec
    row_id: int
    prepared: Prepared
    text: list[str] = field(default_factory=list)
    tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.prepared.num_tokens


_STOP = object()
BURST_WAITS = 4  # an idle worker gathers a burst of requests for at most this many batch waits


def admission_error(load_error: str | None, ready: bool, closing: bool) -> APIError | None:
    """Why no request can be admitted now (503: the model failed to load, is loading, or the server is stopping),
    or None; for one engine and for the replicas together (serve.replicas)."""
    if load_error is not None:
        return APIError(503, f"the model failed to load: {load_error}", code="model_load_failed")
    if not ready:
        return APIError(503, "the model is still loading; retry shortly", code="model_loading",
                        headers={"Retry-After": "5"})
    if closing:
        return APIError(503, "the server is shutting down", code="shutting_down")
    return None


class ClientGone(Exception):
    """The client disconnected; its job has been cancelled."""


# ---------------------------------------------------------------------------------------------- engine


class Engine:
    def __init__(self, backend: Backend, metrics: Metrics, *, replica: int = 0, batch_wait_ms: float = 5.0,
                 max_queue: int = 64, image_cache_size: int = 16) -> None:
        self.backend = backend
        self.metrics = metrics
        self.replica = replica
        self._label = str(replica)  # the `replica` label of its metrics
        self._live: dict[int, _Live] = {}
        self._row_ids = itertools.count()
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._cache: collections.OrderedDict[str, object] = collections.OrderedDict()  # backend-encoded images
        self._cache_size = image_cache_size
        self._thread = threading.Thread(target=self._main, name=f"osprey-engine-{replica}", daemon=True)
        self._inflight: set[Job] = set()
        self.open_rows = 0  # rows of admitted jobs not yet done + scoring tasks not yet answered (event-loop side)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.closing = False
        for gauge in ("model_loaded", "queue_depth", "running", "open_rows"):  # each replica listed from the start
            metrics.set(gauge, 0, replica=self._label)

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
        job = Job(image=image, image_key=image_key, rows=rows, loop=asyncio.get_running_loop(),
                  deadline=time.monotonic() + timeout_s, replica=self.replica)
        self._enqueue(job)
        self._inflight.add(job)
        self._open(len(rows))
        return job

    def submit_task(self, image: Image.Image, image_key: str, work: Callable[[Backend, EncodedImage], Any],
                    timeout_s: float) -> Task:
        """Admit `work(backend, encoded image)`, to run on the worker thread between decoding steps, or raise what
        `submit` raises; `result` awaits it."""
        loop = asyncio.get_running_loop()
        task = Task(image, image_key, work, loop, time.monotonic() + timeout_s, loop.create_future(), self.replica)
        self._enqueue(task)
        self._open(1)
        return task

    async def result(self, task: Task) -> Any:
        """The admitted task's result; raises the APIError its work raises, 400 for its ValueError, 504 on timeout."""
        try:
            return await asyncio.wait_for(task.future, timeout=max(0.0, task.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise APIError(504, "the request timed out before scoring finished", code="timeout") from None
        finally:
            self._open(-1)

    def _open(self, rows: int) -> None:
        self.open_rows += rows
        self.metrics.set("open_rows", self.open_rows, replica=self._label)

    @property
    def status(self) -> str:
        """/health's word for this engine: loading, ok, or error (the model failed to load)."""
        return "error" if self.load_error is not None else "ok" if self.ready.is_set() else "loading"

    def _enqueue(self, item: Job | Task) -> None:
        refused = admission_error(self.load_error, self.ready.is_set(), self.closing)
        if refused is not None:
            raise refused
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise APIError(429, "the server is busy: too many queued requests; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.metrics.set("queue_depth", self._queue.qsize(), replica=self._label)

    async def events(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[RowText | RowDone]:
        """Yield the job's `RowText` and `RowDone` events until every row is done.

        Raises APIError (from the worker, or 504 on timeout) and ClientGone; the job is cancelled then.
        """
        remaining = len(job.rows)
        try:
            while remaining:
                wait = min(0.5, job.deadline - time.monotonic())
                if wait <= 0:
                    raise APIError(504, "the request timed out before generation finished", code="timeout")
                try:
                    batch = await asyncio.wait_for(job.events.get(), timeout=wait)
                except asyncio.TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        raise ClientGone() from None
                    continue
                for event in batch:
                    if isinstance(event, JobFailed):
                        raise event.error
                    if isinstance(event, RowDone):
                        remaining -= 1
                        self._open(-1)
                    yield event
        finally:
            if remaining:
                job.cancelled.set()
                self._open(-remaining)
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
        self.metrics.set("model_loaded", 1, replica=self._label)
        log.info("engine %d: model loaded, ready", self.replica)
        stopping = False
        while not stopping or self.backend.has_work:
            if not stopping:
                stopping = self._take(wait=not self.backend.has_work)
            self._drop_cancelled()
            if self.backend.has_work:
                stepping = time.perf_counter()
                self._step()
                self.metrics.inc("worker_seconds", time.perf_counter() - stepping, replica=self._label, phase="step")
        log.info("engine %d stopped", self.replica)

    def _take(self, wait: bool) -> bool:
        """Admit queued jobs; True on stop. When idle, block for one, then gather the burst it came with: wait while
        requests keep arriving less than `batch_wait` apart, at most BURST_WAITS x `batch_wait` in all. A burst's
        requests (clients answered by the same step send their next together) then share one vision pass and one
        prefill pass, where admitting the first alone costs a pass more and makes the others wait behind it."""
        taken: list[Job | Task] = []
        stop = False
        waited = time.perf_counter()
        if wait:
            item = self._queue.get()
            stop = item is _STOP
            if not stop:
                taken.append(item)
            now = time.monotonic()
            cap, deadline = now + BURST_WAITS * self.batch_wait_s, now + self.batch_wait_s
        else:
            cap = deadline = time.monotonic()
        while not stop:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            stop = item is _STOP
            if not stop:
                taken.append(item)
            deadline = min(cap, time.monotonic() + self.batch_wait_s)
        admitting = time.perf_counter()
        self.metrics.inc("worker_seconds", admitting - waited, replica=self._label, phase="idle")
        if taken:
            self._admit_all(taken)
            self.metrics.inc("worker_seconds", time.perf_counter() - admitting, replica=self._label, phase="admit")
        self.metrics.set("queue_depth", self._queue.qsize(), replica=self._label)
        return stop

    def _admit_all(self, items: list[Job | Task]) -> None:
        """Encode the new images of the jobs taken together in one vision pass, then admit each."""
        now = time.monotonic()
        fresh = self._encode_new([item for item in items if not item.abandoned(now)])
        for item in items:
            self._admit(item, fresh)

    def _admit(self, job: Job | Task, fresh: dict[str, object]) -> None:
        """Encode the image (cached), prepare the job's rows and start them; errors go to that job only."""
        if isinstance(job, Task):
            self._run_task(job, fresh)
            return
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:
            job.fail(APIError(504, "the request timed out in the queue", code="timeout"))
            return
        try:
            encoded = self._encode(job, fresh)
            rows = [_Live(job, spec, next(self._row_ids), prepared)
                    for spec, prepared in zip(job.rows, self._prepare(encoded, job.rows))]
            for live in rows:
                self._check_context(live)
            self._start(rows)
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
        self.metrics.inc("prompt_tokens", sum(live.prompt_tokens for live in rows))
        self._live.update((live.row_id, live) for live in rows)

    def _run_task(self, task: Task, fresh: dict[str, object]) -> None:
        if task.abandoned(time.monotonic()):
            return  # the request has answered 504 already
        try:
            task.resolve(task.work(self.backend, self._encode(task, fresh)))
        except APIError as exc:
            task.resolve(error=exc)
        except ValueError as exc:
            task.resolve(error=APIError(400, str(exc), code="invalid_value"))
        except Exception as exc:
            log.exception("scoring failed")
            task.resolve(error=APIError(500, f"internal error while scoring ({type(exc).__name__})",
                                        code="internal_error"))

    def _start(self, rows: list[_Live]) -> None:
        try:
            self.backend.add([EngineRow(live.row_id, live.prepared, live.spec.params) for live in rows])
        except ValueError as exc:  # a row larger than the engine's row slots (--max-row-tokens)
            raise APIError(400, f"a region's prompt and max_tokens do not fit this server's engine ({exc}); lower "
                                "max_tokens or shorten the conversation", param="max_tokens",
                           code="context_length_exceeded") from None

    def _prepare(self, encoded: object, rows: list[RowSpec]) -> list[Prepared]:
        """Rows that differ only by their one mask (describe) are prepared in one call."""
        if len(rows) > 1 and all(r.turns == rows[0].turns and r.masks.shape[0] == 1 for r in rows):
            return self.backend.prepare_each(encoded, rows[0].turns, np.concatenate([r.masks for r in rows]))
        return [self.backend.prepare(encoded, spec.turns, spec.masks) for spec in rows]

    def _check_context(self, live: _Live) -> None:
        limit = self.backend.max_context_tokens()
        wanted = live.prompt_tokens + live.spec.params.max_new_tokens
        if limit is not None and wanted > limit:
            raise APIError(400, f"the prompt has {live.prompt_tokens} tokens and {live.spec.params.max_new_tokens} "
                                f"more were asked for, but the model's context is {limit} tokens; shorten the "
                                "conversation or lower max_tokens", param="messages", code="context_length_exceeded")

    def _encode_new(self, items: list[Job | Task]) -> dict[str, object]:
        """The images of `items` not in the cache, encoded together (key -> encoded). A single image, or a batch that
        fails, is left to `_encode`, job by job, so that an error reaches the job whose image caused it."""
        wanted = {item.image_key: item.image for item in items if item.image_key not in self._cache}
        if len(wanted) < 2:
            return {}
        try:
            encoded = self.backend.encode_images([as_rgb(image) for image in wanted.values()])
        except Exception:  # each job then encodes alone and gets its own error
            log.warning("encoding %d images together failed; encoding them one by one", len(wanted), exc_info=True)
            return {}
        return dict(zip(wanted, encoded))

    def _encode(self, job: Job | Task, fresh: dict[str, object]) -> object:
        encoded = self._cache.get(job.image_key)
        if encoded is not None:
            self._cache.move_to_end(job.image_key)
            self.metrics.inc("image_cache", result="hit")
            return encoded
        self.metrics.inc("image_cache", result="miss")
        if job.image_key in fresh:
            encoded = fresh[job.image_key]
        else:
            encoded = self.backend.encode_images([as_rgb(job.image)])[0]
        self._cache[job.image_key] = encoded
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return encoded

    def _drop_cancelled(self) -> None:
        """Rows of cancelled jobs (client gone, timeout, shutdown) leave the decoder before the next step."""
        for row_id in [row_id for row_id, live in self._live.items() if live.job.cancelled.is_set()]:
            self.backend.cancel(row_id)
            del self._live[row_id]

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            events = self.backend.step()
        except Exception as exc:
            log.exception("generation failed")
            for row_id, live in list(self._live.items()):
                live.job.fail(APIError(500, f"generation failed ({type(exc).__name__})", code="internal_error"))
                self.backend.cancel(row_id)
            self._live.clear()
            return
        tokens = 0
        outbox: dict[Job, list[JobEvent]] = {}
        for event in events:
            live = self._live.get(event.row)
            if live is not None:
                tokens += event.token_id is not None
                outbox.setdefault(live.job, []).extend(self._on_event(live, event))
        for job, batch in outbox.items():
            job.emit(*batch)
        self.metrics.set("running", self.backend.live_rows, replica=self._label)
        if events:  # an asynchronous backend (vLLM) may have had nothing new within its wait
            self.metrics.batch_done(self._label, len(events), tokens, time.perf_counter() - started)

    def _on_event(self, live: _Live, event: StreamEvent) -> list[JobEvent]:
        """Record a row's step; what its job is told (sent with the step's other events for that job)."""
        if event.finish_reason == "error":  # the backend failed this row alone (vLLM: its request failed)
            del self._live[live.row_id]
            return [JobFailed(APIError(500, "generation failed for a region of this request", code="internal_error"))]
        told: list[JobEvent] = []
        if event.token_id is not None:
            live.tokens += 1
        if event.text_delta:
            live.text.append(event.text_delta)
            if live.job.first_token is None:
                live.job.first_token = time.perf_counter()
                self.metrics.observe("ttft", live.job.first_token - live.job.submitted)
            told.append(RowText(live.spec.index, event.text_delta))
        if event.finished:
            del self._live[live.row_id]
            told.append(RowDone(RowResult(
                index=live.spec.index, raw_text="".join(live.text), prompt_tokens=live.prompt_tokens,
                completion_tokens=live.tokens, finish_reason=event.finish_reason or "stop")))
        return told
