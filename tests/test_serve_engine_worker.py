"""`serve.engine.Engine` without HTTP: the real pipeline backend on the tiny model, driven from an event loop.

What a request gets back (text, token counts, finish reasons) is compared with `OspreyPipeline`'s own answers on
the same masks; admission errors, the image cache and the per-job failure paths are checked by their codes and
the metrics they leave. The server-level behaviours (streaming, disconnects, shutdown) are in
`test_serve_engine.py`.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from osprey.generation import SamplingParams
from osprey.prompts import multi_region_question, task_prompt
from serve.engine import Engine, EngineSize, JobFailed, PipelineBackend, RowDone, RowSpec, RowText
from serve.errors import APIError
from serve.metrics import Metrics

GREEDY = SamplingParams(max_new_tokens=4)


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8))


def _masks() -> np.ndarray:
    masks = np.zeros((3, 24, 32), dtype=bool)
    masks[0, 2:10, 2:12] = True
    masks[1, 12:20, 4:30] = True
    masks[2, :, 16:] = True
    return masks


def _describe_rows(masks: np.ndarray, params: SamplingParams = GREEDY) -> list[RowSpec]:
    return [RowSpec(i, [("human", task_prompt("short"))], masks[i:i + 1], params) for i in range(len(masks))]


class FailingStepBackend(PipelineBackend):
    """The pipeline backend whose decoding step raises once `fail` is set (a generation error mid-request)."""

    fail = False

    def step(self):
        if self.fail:
            raise RuntimeError("decoding broke")
        return super().step()


class BrokenPrepareBackend(PipelineBackend):
    """The pipeline backend whose prompt preparation fails with an unexpected (non-ValueError) error."""

    def prepare_each(self, encoded, turns, masks):
        raise RuntimeError("tokenizer broke")


def _backend(pipe, cls=PipelineBackend, **size) -> PipelineBackend:
    # the test process keeps its torch threads (the backend would otherwise set all cores but one)
    return cls("unused", cpu_threads=torch.get_num_threads(), size=EngineSize(**size), pipeline=pipe)


def _run(engine: Engine, coro_fn):
    """Start the engine, run `coro_fn(engine)` in a fresh event loop, then shut the engine down."""

    async def main():
        engine.start()
        while not engine.ready.is_set():
            assert engine.load_error is None, engine.load_error
            await asyncio.sleep(0.01)
        try:
            return await coro_fn(engine)
        finally:
            await engine.shutdown(timeout_s=5)

    return asyncio.run(main())


async def _collect(engine: Engine, job) -> tuple[list[RowText], list[RowDone]]:
    texts, done = [], []
    async for event in engine.events(job):
        (texts if isinstance(event, RowText) else done).append(event)
    return texts, done


def _sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_rows_get_the_pipelines_answers_and_counts(tiny_pipeline):
    """Three describe rows and one two-region row in one job: each result is the pipeline's own answer for the same
    masks, its streamed text adds up to it, and the metrics count the prompt tokens and one first token."""
    image, masks = _image(), _masks()
    multi = RowSpec(3, [("human", multi_region_question(2, "What is region2 next to?"))], masks[[2, 0]], GREEDY)
    metrics = Metrics()
    engine = Engine(_backend(tiny_pipeline), metrics)

    async def scenario(engine):
        return await _collect(engine, engine.submit(image, "img", _describe_rows(masks) + [multi], 30))

    texts, done = _run(engine, scenario)
    encoded = tiny_pipeline.encode_image(image)
    expected = tiny_pipeline.describe(encoded, masks, "short", GREEDY)
    expected += tiny_pipeline.generate([tiny_pipeline.prepare(encoded, multi.turns, multi.masks)], GREEDY)
    results = sorted((event.result for event in done), key=lambda r: r.index)
    assert [r.index for r in results] == [0, 1, 2, 3]
    for result, gen in zip(results, expected):
        assert (result.raw_text, result.prompt_tokens, result.completion_tokens, result.finish_reason) == (
            gen.raw_text, gen.prompt_tokens, gen.completion_tokens, gen.finish_reason)
        assert "".join(t.text for t in texts if t.index == result.index) == result.raw_text
    assert results[0].completion_tokens == GREEDY.max_new_tokens or results[0].finish_reason == "stop"
    assert _sample(metrics, "osprey_prompt_tokens_total") == sum(g.prompt_tokens for g in expected)
    assert _sample(metrics, "osprey_time_to_first_token_seconds_count") == 1  # once per job, not per row
    assert _sample(metrics, "osprey_image_cache_total", result="miss") == 1
    assert _sample(metrics, "osprey_model_loaded", replica="0") == 1
    assert not engine._live and engine.backend.live_rows == 0


def test_the_image_cache_keeps_the_most_recently_used(tiny_pipeline):
    """A cache of two images: a, b, a (hit), c (evicts b, the least recently used), a (hit), b (miss)."""
    metrics = Metrics()
    engine = Engine(_backend(tiny_pipeline), metrics, image_cache_size=2)
    images = {key: Image.fromarray(np.full((24, 32, 3), value, np.uint8)) for key, value in zip("abc", (0, 90, 180))}
    one_row = [RowSpec(0, [("human", task_prompt("short"))], _masks()[:1], SamplingParams(max_new_tokens=1))]

    async def scenario(engine):
        hits = []
        for key in "abacab":
            before = _sample(metrics, "osprey_image_cache_total", result="hit")
            await _collect(engine, engine.submit(images[key], key, one_row, 30))
            hits.append(_sample(metrics, "osprey_image_cache_total", result="hit") > before)
        return hits

    assert _run(engine, scenario) == [False, False, True, False, True, False]
    assert list(engine._cache) == ["a", "b"]


class CountingBackend(PipelineBackend):
    """The pipeline backend that records how many images each vision pass took, and fails any pass that holds an
    image of the colour in `poison` (a pass with that image alone included)."""

    poison: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes: list[int] = []

    def encode_images(self, images):
        self.passes.append(len(images))
        if any(int(np.asarray(image)[0, 0, 0]) == self.poison for image in images):
            raise RuntimeError("this image breaks the vision tower")
        return super().encode_images(images)


def _queued_together(engine: Engine, images: dict[str, Image.Image], rows: list[RowSpec]) -> list[str | int]:
    """One job per image, submitted back to back (the engine waits `batch_wait_ms` after the first for more) ->
    each job's answer, or its error's status."""
    async def scenario(engine):
        engine.backend.passes.clear()
        jobs = [engine.submit(image, key, rows, 30) for key, image in images.items()]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append((await _collect(engine, job))[1][0].result.raw_text)
            except APIError as error:
                outcomes.append(error.status)
        return outcomes
    return _run(engine, scenario)


def test_images_queued_together_are_encoded_in_one_pass(tiny_pipeline):
    """Three jobs waiting together: one vision pass for their three images, and each answer is the pipeline's own."""
    images = {key: Image.fromarray(np.full((24, 32, 3), value, np.uint8)) for key, value in zip("abc", (10, 90, 180))}
    engine = Engine(_backend(tiny_pipeline, CountingBackend), Metrics(), batch_wait_ms=500)
    rows = _describe_rows(_masks()[:1])
    answers = _queued_together(engine, images, rows)
    assert engine.backend.passes == [3]
    assert answers == [tiny_pipeline.describe(image, _masks()[:1], "short", GREEDY)[0].raw_text
                       for image in images.values()]


@pytest.mark.parametrize("gap_s, passes", [(0.15, [4]), (0.6, [1, 1, 1, 1])])
def test_an_idle_worker_gathers_a_burst_while_it_keeps_arriving(tiny_pipeline, gap_s, passes):
    """batch_wait 400 ms: four jobs 150 ms apart (600 ms from first to last, longer than one batch wait, shorter
    than the burst cap of 4 waits) share one vision pass; 600 ms apart, each is admitted alone."""
    images = {key: Image.fromarray(np.full((24, 32, 3), value, np.uint8)) for key, value in zip("abcd", (10, 90, 180, 250))}
    engine = Engine(_backend(tiny_pipeline, CountingBackend), Metrics(), batch_wait_ms=400)
    rows = _describe_rows(_masks()[:1], SamplingParams(max_new_tokens=1))

    async def scenario(engine):
        engine.backend.passes.clear()
        jobs = []
        for key, image in images.items():
            jobs.append(engine.submit(image, key, rows, 30))
            await asyncio.sleep(gap_s)
        return [await _collect(engine, job) for job in jobs]

    _run(engine, scenario)
    assert engine.backend.passes == passes


def test_a_pass_that_fails_falls_back_to_one_image_at_a_time_and_fails_only_its_job(tiny_pipeline):
    images = {key: Image.fromarray(np.full((24, 32, 3), value, np.uint8)) for key, value in zip("abc", (10, 90, 180))}
    backend = _backend(tiny_pipeline, CountingBackend)
    backend.poison = 90
    engine = Engine(backend, Metrics(), batch_wait_ms=500)
    answers = _queued_together(engine, images, _describe_rows(_masks()[:1]))
    assert backend.passes == [3, 1, 1, 1]
    assert answers[1] == 500 and isinstance(answers[0], str) and isinstance(answers[2], str)


def test_an_rgba_image_is_encoded_as_rgb(tiny_pipeline):
    """A non-RGB image is converted before encoding: its answer is the RGB image's."""
    rgb = _image()
    rgba = rgb.convert("RGBA")
    engine = Engine(_backend(tiny_pipeline), Metrics())

    async def scenario(engine):
        _, done = await _collect(engine, engine.submit(rgba, "rgba", _describe_rows(_masks()[:1]), 30))
        return done[0].result.raw_text

    assert _run(engine, scenario) == tiny_pipeline.describe(rgb, _masks()[:1], "short", GREEDY)[0].raw_text


@pytest.mark.parametrize(
    "rows, size, status, code, param, message",
    [
        # two regions named, one mask given
        ([RowSpec(0, [("human", multi_region_question(2, "Compare them."))], _masks()[:1], GREEDY)], {},
         400, "invalid_prompt", "messages", "invalid prompt: "),
        # prompt + max_new_tokens beyond the tiny model's 1024 positions
        (_describe_rows(_masks()[:1], SamplingParams(max_new_tokens=4096)), {"max_row_tokens": 5000},
         400, "context_length_exceeded", "messages",
         "the prompt has 176 tokens and 4096 more were asked for, but the model's context is 1024 tokens"),
        # a row longer than the engine's row slots
        (_describe_rows(_masks()[:1], SamplingParams(max_new_tokens=64)), {"max_row_tokens": 32},
         400, "context_length_exceeded", "max_tokens", "do not fit this server's engine"),
    ],
)
def test_a_job_that_cannot_run_fails_alone(tiny_pipeline, rows, size, status, code, param, message):
    """The failing job gets its error; the next job on the same engine is answered."""
    metrics = Metrics()
    engine = Engine(_backend(tiny_pipeline, **size), metrics)

    async def scenario(engine):
        with pytest.raises(APIError) as err:
            await _collect(engine, engine.submit(_image(), "img", rows, 30))
        _, done = await _collect(engine, engine.submit(_image(), "img", _describe_rows(_masks()[:1]), 30))
        return err.value, done

    error, done = _run(engine, scenario)
    assert (error.status, error.code, error.param) == (status, code, param)
    assert message in error.message
    assert len(done) == 1 and done[0].result.completion_tokens >= 1
    assert _sample(metrics, "osprey_prompt_tokens_total") == done[0].result.prompt_tokens  # the failed job's: none


def test_a_generation_error_fails_every_running_job_with_500(tiny_pipeline):
    backend = _backend(tiny_pipeline, FailingStepBackend)
    engine = Engine(backend, Metrics())

    async def scenario(engine):
        backend.fail = True
        jobs = [engine.submit(_image(), "img", _describe_rows(_masks()[:2]), 30) for _ in range(2)]
        errors = []
        for job in jobs:
            with pytest.raises(APIError) as err:
                await _collect(engine, job)
            errors.append(err.value)
        backend.fail = False
        _, done = await _collect(engine, engine.submit(_image(), "img", _describe_rows(_masks()[:1]), 30))
        return errors, done

    errors, done = _run(engine, scenario)
    assert [(e.status, e.code, e.message) for e in errors] == [
        (500, "internal_error", "generation failed (RuntimeError)")] * 2
    assert len(done) == 1 and not engine._live


def test_an_unexpected_error_while_preparing_is_a_500_naming_its_type(tiny_pipeline):
    engine = Engine(_backend(tiny_pipeline, BrokenPrepareBackend), Metrics())

    async def scenario(engine):
        with pytest.raises(APIError) as err:
            await _collect(engine, engine.submit(_image(), "img", _describe_rows(_masks()[:2]), 30))
        return err.value

    error = _run(engine, scenario)
    assert (error.status, error.code, error.message) == (
        500, "internal_error", "internal error while preparing the prompt (RuntimeError)")


def test_a_steps_events_reach_the_job_as_one_batch(tiny_pipeline):
    """The worker hands a job each decoding step's events (its regions' text and ends) as one queue item, not one
    per region and token: three regions decoded together for 4 tokens arrive in at most one batch per step."""
    engine = Engine(_backend(tiny_pipeline), Metrics())

    async def scenario(engine):
        job = engine.submit(_image(), "img", _describe_rows(_masks()), 30.0)
        batches = []
        while sum(isinstance(e, RowDone) for batch in batches for e in batch) < 3:
            batches.append(await asyncio.wait_for(job.events.get(), 30))
        return batches

    batches = _run(engine, scenario)
    events = [e for batch in batches for e in batch]
    texts = [e for e in events if isinstance(e, RowText)]
    assert len(events) == len(texts) + 3 and len(texts) >= 3
    assert len(batches) <= GREEDY.max_new_tokens + 1 < len(events)
    assert {e.index for e in texts[:3]} == {0, 1, 2}  # the first step's batch carries all three regions


def test_the_workers_time_is_counted_by_phase(tiny_pipeline):
    """osprey_worker_seconds_total splits the worker's time into idle (waiting for work), admit and step; a job
    that waits on the queue for 0.3 s before it is submitted leaves at least that as idle time."""
    metrics = Metrics()
    engine = Engine(_backend(tiny_pipeline), metrics)

    async def scenario(engine):
        await asyncio.sleep(0.3)
        return await _collect(engine, engine.submit(_image(), "img", _describe_rows(_masks()), 30.0))

    _, done = _run(engine, scenario)
    assert len(done) == 3
    seconds = {phase: _sample(metrics, "osprey_worker_seconds_total", replica="0", phase=phase)
               for phase in ("idle", "admit", "step")}
    assert seconds["idle"] >= 0.3 and seconds["admit"] > 0 and seconds["step"] > 0


def test_a_job_past_its_deadline_in_the_queue_is_not_started(tiny_pipeline):
    metrics = Metrics()
    engine = Engine(_backend(tiny_pipeline), metrics)

    async def scenario(engine):
        job = engine.submit(_image(), "img", _describe_rows(_masks()), 0.0)  # expired before the worker sees it
        (event,) = await asyncio.wait_for(job.events.get(), 30)
        with pytest.raises(APIError) as err:  # events() itself: the deadline has passed
            await _collect(engine, job)
        return event, err.value

    event, error = _run(engine, scenario)
    assert isinstance(event, JobFailed)
    assert (event.error.status, event.error.code, event.error.message) == (
        504, "timeout", "the request timed out in the queue")
    assert (error.status, error.message) == (504, "the request timed out before generation finished")
    assert _sample(metrics, "osprey_prompt_tokens_total") == 0
    assert _sample(metrics, "osprey_image_cache_total", result="miss") == 0  # not even encoded


def test_admission_is_refused_while_loading_when_full_and_when_closing(tiny_pipeline):
    metrics = Metrics()
    engine = Engine(_backend(tiny_pipeline), metrics, max_queue=1)
    rows = _describe_rows(_masks()[:1])

    async def scenario():
        with pytest.raises(APIError) as loading:
            engine.submit(_image(), "img", rows, 30)  # the worker is not started: the model is not loaded
        engine.ready.set()  # as the worker does after loading; no worker takes jobs off the queue here
        engine.submit(_image(), "img", rows, 30)
        depth = _sample(metrics, "osprey_queue_depth", replica="0")
        with pytest.raises(APIError) as full:
            engine.submit(_image(), "img", rows, 30)
        engine.closing = True
        with pytest.raises(APIError) as closing:
            engine.submit(_image(), "img", rows, 30)
        return loading.value, depth, full.value, closing.value

    loading, depth, full, closing = asyncio.run(scenario())
    assert (loading.status, loading.code, loading.headers) == (503, "model_loading", {"Retry-After": "5"})
    assert depth == 1
    assert (full.status, full.code, full.headers) == (429, "queue_full", {"Retry-After": "1"})
    assert (closing.status, closing.code) == (503, "shutting_down")


def test_a_model_that_fails_to_load_is_named_to_every_request(tmp_path):
    metrics = Metrics()
    engine = Engine(PipelineBackend(str(tmp_path / "absent"), cpu_threads=torch.get_num_threads()), metrics)
    engine.start()
    engine._thread.join(60)
    assert not engine._thread.is_alive() and not engine.ready.is_set()

    async def scenario():
        with pytest.raises(APIError) as err:
            engine.submit(_image(), "img", _describe_rows(_masks()[:1]), 30)
        return err.value

    error = asyncio.run(scenario())
    assert (error.status, error.code) == (503, "model_load_failed")
    assert error.message.startswith("the model failed to load: ") and "absent" in error.message
    assert _sample(metrics, "osprey_model_loaded", replica="0") == 0


def test_the_engine_pool_is_sized_from_the_engine_settings(tiny_pipeline):
    size = {"max_rows": 64, "max_row_tokens": 64, "kv_cache_gb": 0.01, "rows_per_image": 2}
    backend = _backend(tiny_pipeline, **size)
    backend.load()
    expected = tiny_pipeline.engine_pool(64, 64, 0.01, 2)
    assert backend.session.decoder.pool.size == expected
    assert expected != tiny_pipeline.engine_pool(64, 64, None, 2)  # the KV budget is what binds here
    assert Engine(backend, Metrics())._thread.daemon  # a stuck worker never keeps the process alive
