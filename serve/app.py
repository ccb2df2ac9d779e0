"""The FastAPI application: OpenAI chat completions, native region descriptions, models, health, metrics.

Built by `create_app(config, backend)`; the engine starts in the lifespan and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from osprey.prompts import clean_answer, task_prompt

from . import inputs
from .chat import ChatConversation, bind_regions, parse_messages
from .config import ServeConfig
from .engine import Backend, ClientGone, Engine, PipelineBackend, RowResult, RowSpec
from .errors import APIError, bad_request, error_body, loc_to_param
from .metrics import Metrics
from .schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    DescribeRequest,
    DescribeResponse,
    ModelCard,
    ModelList,
    RegionResult,
    Usage,
)

log = logging.getLogger(__name__)
_ENDPOINTS = ("/v1/chat/completions", "/v1/regions/describe", "/v1/models", "/health", "/metrics")


def create_app(config: ServeConfig, backend: Backend | None = None) -> FastAPI:
    """The server for `config`; `backend` defaults to the in-process pipeline on `config.model`."""
    metrics = Metrics()
    engine = Engine(backend or PipelineBackend(config.model, config.device, config.dtype), metrics,
                    max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms,
                    max_queue=config.max_queue, image_cache_size=config.image_cache_size)
    limits = inputs.Limits(config.max_image_pixels, config.max_image_side)
    inputs.set_pil_limits(limits)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(timeout_s=config.request_timeout_s)

    app = FastAPI(title="Osprey region server", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(_GuardMiddleware, config=config, metrics=metrics)
    _add_error_handlers(app)

    # ------------------------------------------------------------------ plain endpoints

    @app.get("/health")
    async def health() -> Response:
        if engine.load_error is not None:
            return JSONResponse({"status": "error", "error": engine.load_error}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, created=created)])

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------------ chat completions

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(body.model, config)
        conv = parse_messages(body.messages)
        if conv.chars > config.max_prompt_chars:
            raise bad_request(f"the messages hold {conv.chars} characters; at most {config.max_prompt_chars}",
                              "messages", "prompt_too_long")
        max_tokens = _max_tokens(body.max_completion_tokens or body.max_tokens
                                 or min(config.default_chat_max_tokens, config.max_tokens_limit),
                                 "max_completion_tokens" if body.max_completion_tokens else "max_tokens", config)
        if body.n > config.max_n:
            raise bad_request(f"n = {body.n} is more than {config.max_n}", "n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request("stop takes up to 4 non-empty strings", "stop")
        image, masks = await _chat_image_and_masks(conv, body, config, limits)
        bind_regions(conv, len(masks))
        if len(conv.region_order) > config.max_regions:
            raise bad_request(f"the messages mention regions {len(conv.region_order)} times; at most "
                              f"{config.max_regions}", "messages", "too_many_regions")
        bound = masks[conv.region_order] if conv.region_order else masks[:0]
        rows = [RowSpec(i, list(conv.turns), bound, _sampling(
            max_tokens, 0.0 if body.temperature is None else body.temperature,
            1.0 if body.top_p is None else body.top_p, None if body.seed is None else body.seed + i, tuple(stops)))
            for i in range(body.n)]
        job = engine.submit(image.image, image.key, rows, config.request_timeout_s)
        events, first = await _start(engine, job, request)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_sse(events, first, rid, now, config.model_name, body.n, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _collect(events, first)
        return JSONResponse(ChatCompletion(
            id=rid, created=now, model=config.model_name,
            choices=[Choice(index=r.index, message=AssistantMessage(content=_chat_text(r.raw_text)),
                            finish_reason=r.finish_reason) for r in results],
            usage=_usage(results)).model_dump())

    # ------------------------------------------------------------------ native describe

    @app.post("/v1/regions/describe")
    async def describe(body: DescribeRequest, request: Request) -> Response:
        _check_model(body.model, config)
        try:
            prompt = task_prompt(body.task)
        except ValueError as exc:
            raise bad_request(str(exc), "task") from None
        if len(body.task) > config.max_prompt_chars:
            raise bad_request(f"task prompt is longer than {config.max_prompt_chars} characters", "task",
                              "prompt_too_long")
        max_tokens = _max_tokens(body.max_tokens, "max_tokens", config)
        image = await _load_image(body.image, "image", config, limits)
        h, w = image.size_hw
        masks = await asyncio.to_thread(inputs.decode_regions, body.regions, h, w, limits,
                                        max_regions=config.max_regions, resize=body.resize_masks)
        params = _sampling(max_tokens, body.temperature, body.top_p, body.seed, ())
        rows = [RowSpec(i, [("human", prompt)], masks[i:i + 1], params) for i in range(len(masks))]
        job = engine.submit(image.image, image.key, rows, config.request_timeout_s)
        events, first = await _start(engine, job, request)
        rid, now = f"desc-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_describe_ndjson(events, first), media_type="application/x-ndjson")
        results = await _collect(events, first)
        return JSONResponse(DescribeResponse(
            id=rid, created=now, model=config.model_name, results=[_region_result(r) for r in results],
            usage=_usage(results)).model_dump())

    return app


# ---------------------------------------------------------------------------------------------- request helpers


def _check_model(model: str | None, config: ServeConfig) -> None:
    if model and model != config.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                       param="model", code="model_not_found")


def _max_tokens(value: int, param: str, config: ServeConfig) -> int:
    if value > config.max_tokens_limit:
        raise bad_request(f"{param} = {value} is more than {config.max_tokens_limit}", param, "max_tokens_too_large")
    return value


_GREEDY_BELOW = 1e-4  # temperatures this small are greedy (dividing logits by ~0 overflows to inf/nan)


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None, stop: tuple[str, ...]) -> Any:
    from osprey.inference import SamplingParams

    temperature = 0.0 if temperature < _GREEDY_BELOW else temperature
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    except ValueError as exc:
        raise bad_request(f"invalid sampling parameters: {exc}", None) from None


async def _load_image(source: str, param: str, config: ServeConfig, limits: inputs.Limits) -> inputs.DecodedImage:
    if not isinstance(source, str) or not source.strip():
        raise bad_request("the image is empty", param, "invalid_image")
    if inputs.is_remote_url(source):
        if not config.allow_image_urls:
            raise bad_request("image URLs are disabled on this server (start it with --allow-image-urls); "
                              "send the image as a base64 data URL", param, "image_urls_disabled")
        raw = await inputs.fetch_url(source, param, max_bytes=config.max_body_bytes,
                                     timeout_s=config.url_fetch_timeout_s)
    else:
        raw = inputs.decode_base64(source, param)
    return await asyncio.to_thread(inputs.open_image, raw, param, limits)


async def _chat_image_and_masks(conv: ChatConversation, body: ChatCompletionRequest, config: ServeConfig,
                                limits: inputs.Limits) -> tuple[inputs.DecodedImage, np.ndarray]:
    """The image (first image_url) and the region masks `(Q, H, W) bool`: from `regions`, from extra images
    (their alpha, DAM convention), or from the image's own alpha channel."""
    image = await _load_image(conv.images[0].url, conv.images[0].param, config, limits)
    h, w = image.size_hw
    extra = conv.images[1:]
    if body.regions is not None and extra:
        raise bad_request("give regions either in 'regions' or as extra mask images, not both", "regions")
    if body.regions is not None:
        masks = await asyncio.to_thread(inputs.decode_regions, body.regions, h, w, limits,
                                        max_regions=config.max_regions, resize=body.resize_masks)
        return image, masks
    if len(extra) > config.max_regions:
        raise bad_request(f"too many mask images: {len(extra)} > {config.max_regions}", "messages", "too_many_regions")
    if extra:
        masks = np.zeros((len(extra), h, w), dtype=bool)
        for i, ref in enumerate(extra):
            mask_image = await _load_image(ref.url, ref.param, config, limits)
            masks[i] = inputs.fit_mask(inputs.image_as_mask(mask_image.image), h, w, resize=body.resize_masks,
                                       param=ref.param)
        return image, masks
    alpha = inputs.alpha_mask(image.image)
    if alpha is not None:
        return image, alpha[None]
    return image, np.zeros((0, h, w), dtype=bool)


async def _start(engine: Engine, job: Any, request: Request) -> tuple[AsyncIterator[tuple], tuple]:
    """Wait for the job's first event, so errors found by the worker (bad prompt, timeout) are still HTTP
    statuses, even for streams. Returns the event iterator and that first event."""
    events = engine.events(job, request.is_disconnected)
    try:
        first = await events.__anext__()
    except ClientGone:
        raise APIError(499, "client disconnected", code="client_closed") from None
    return events, first


async def _collect(events: AsyncIterator[tuple], first: tuple) -> list[RowResult]:
    results: list[RowResult] = []
    try:
        event = first
        while True:
            if event[0] == "done":
                results.append(event[2])
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
    except ClientGone:
        raise APIError(499, "client disconnected", code="client_closed") from None
    finally:
        await events.aclose()
    return sorted(results, key=lambda r: r.index)


async def _all_events(events: AsyncIterator[tuple], first: tuple) -> AsyncIterator[tuple]:
    yield first
    async for event in events:
        yield event


def _chat_text(raw: str) -> str:
    text = raw.strip()
    return text[: -len("</s>")].rstrip() if text.endswith("</s>") else text


def _usage(results: list[RowResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _region_result(r: RowResult) -> RegionResult:
    return RegionResult(index=r.index, text=clean_answer(r.raw_text), raw_text=r.raw_text,
                        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                        finish_reason=r.finish_reason)


async def _chat_sse(events: AsyncIterator[tuple], first: tuple, rid: str, created: int, model: str, n: int,
                    include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events; an error after the stream began is sent as an error event."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        data = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {data.model_dump_json(exclude_none=False)}\n\n"

    results: list[RowResult] = []
    try:
        yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        async for event in _all_events(events, first):
            if event[0] == "delta":
                yield chunk([ChunkChoice(index=event[1], delta=Delta(content=event[2]))])
            elif event[0] == "done":
                results.append(event[2])
                yield chunk([ChunkChoice(index=event[1], delta=Delta(), finish_reason=event[2].finish_reason)])
        if include_usage:
            yield chunk([], _usage(results))
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except ClientGone:
        return
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


async def _describe_ndjson(events: AsyncIterator[tuple], first: tuple) -> AsyncIterator[str]:
    results: list[RowResult] = []
    try:
        async for event in _all_events(events, first):
            if event[0] == "done":
                results.append(event[2])
                yield _region_result(event[2]).model_dump_json() + "\n"
        yield json.dumps({"usage": _usage(results).model_dump(), "done": True}) + "\n"
    except APIError as exc:
        yield json.dumps(exc.body()) + "\n"
    except ClientGone:
        return
    finally:
        await events.aclose()


# ---------------------------------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 becomes OpenAI's 400 `invalid_request_error`, naming the first offending field."""
        errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": "invalid"}]
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body(400, "the request body is not valid JSON", code="invalid_json"), 400)
        # a union reports one error per branch: the deepest one names the field best
        first = max(errors, key=lambda e: len(_clean_loc(e.get("loc", ()))))
        param = loc_to_param(_clean_loc(first.get("loc", ())))
        kind = first.get("type", "invalid")
        code = {"extra_forbidden": "unknown_field", "missing": "missing_field"}.get(kind, "invalid_value")
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if kind == "extra_forbidden":
            message = f"unknown field {param!r}"
        return JSONResponse(error_body(400, message, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "invalid_json" if exc.status_code == 400 else "http_error"  # FastAPI's 400: unparsable body
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code=code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__})", code="internal_error"),
                            status_code=500)


def _clean_loc(loc: Any) -> list[Any]:
    """Drop pydantic's union markers from an error location: branch names (`str`, `list[str]`, ...) and
    the tag of a tagged union (`content.list[tagged-union[...]].0.image_url.image_url.url` ->
    `content[0].image_url.url`)."""
    out: list[Any] = []
    drop_tag = expect_tag = False
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            expect_tag = drop_tag
            continue
        text = str(part)
        if "tagged-union" in text:
            drop_tag = True
            continue
        if expect_tag:
            expect_tag = drop_tag = False
            continue
        if "[" in text or text in ("str", "int", "float", "bool", "none"):
            continue
        out.append(part)
    return out


# ---------------------------------------------------------------------------------------------- middleware


class _GuardMiddleware:
    """API-key auth on /v1/*, a body-size cap enforced before parsing, and per-endpoint request metrics."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._check_auth(scope) if path.startswith("/v1/") else None
            body_receive = None
            if error is None:
                body_receive, error = await self._read_body(scope, receive)
            if error is not None:
                await _send_json(send_wrapper, error)
            else:
                await self.app(scope, body_receive, send_wrapper)
        finally:
            self.metrics.request_done(endpoint, status["code"], started)

    def _check_auth(self, scope: dict) -> APIError | None:
        if self._key is None:
            return None
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if not token or not hmac.compare_digest(token, self._key):
            return APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, scope: dict, receive: Any) -> tuple[Any, APIError | None]:
        """Read the whole body up to the cap (413 on Content-Length or once exceeded), then replay it."""
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return None, too_large
            except ValueError:
                return None, APIError(400, "invalid Content-Length header", code="invalid_header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, None  # the app sees the disconnect itself
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return None, too_large
            chunks.append(body)
            if not message.get("more_body", False):
                break
        data, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return replay, None


async def _send_json(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
