"""The FastAPI application: OpenAI chat completions, native region descriptions, models, health, metrics.

Built by `create_app(config, backends)`; the routes live on `router` and read the server's state (config, engine
replicas, limits) from `app.state.server`; the engines start in the lifespan and drain on shutdown. Fixed request rules
are in the pydantic schemas (serve.schemas); the rules that depend on the server's settings are checked here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from osprey.generation import SamplingParams
from osprey.masks import alpha_mask
from osprey.prompts import REGION_PLACEHOLDER, clean_answer, task_prompt
from osprey.segment import Segmenters

from . import embeddings, inputs, playground, regions_score, segment_routes
from .chat import ChatConversation, bind_regions, parse_messages
from .config import ServeConfig
from .engine import Backend, ClientGone, Engine, Job, PipelineBackend, RowDone, RowResult, RowSpec, RowText
from .errors import APIError, bad_request
from .guard import GuardMiddleware, add_error_handlers
from .metrics import Metrics
from .replicas import EngineReplicas
from .schemas import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    DescribeRequest,
    DescribeResponse,
    Health,
    ModelCard,
    ModelList,
    RegionResult,
    ReplicaHealth,
    Usage,
    regions_payload,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerState:
    """What every route reads: set on `app.state.server` by `create_app`."""

    config: ServeConfig
    engine: EngineReplicas  # one engine per device in config.devices
    metrics: Metrics
    limits: inputs.Limits
    created: int  # the served model's creation time in /v1/models


def create_app(config: ServeConfig, backends: list[Backend] | None = None,
               segmenters: Segmenters | None = None) -> FastAPI:
    """The server for `config`; `backends` (one per device in `config.devices`) default to the in-process pipeline
    on `config.model`, loaded on each device; `segmenters` are the SAM models behind /v1/segment (none by default:
    those routes then say how to enable them)."""
    metrics = Metrics()
    backends = backends or [PipelineBackend(config.model, device, config.dtype, config.cpu_threads, config.engine_size)
                            for device in config.devices]
    engine = EngineReplicas([Engine(backend, metrics, replica=i, batch_wait_ms=config.batch_wait_ms,
                                    max_queue=config.max_queue, image_cache_size=config.image_cache_size)
                             for i, backend in enumerate(backends)], config.devices, metrics)
    limits = inputs.Limits(config.max_image_pixels, config.max_image_side)
    inputs.set_pil_limits(limits)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(timeout_s=config.request_timeout_s)

    # /docs is served from local assets (serve.playground): FastAPI's own page loads Swagger UI from a CDN.
    app = FastAPI(title="Osprey region server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState(config, engine, metrics, limits, int(time.time()))
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.state.segmenters = segmenters or Segmenters()
    app.add_middleware(GuardMiddleware, config=config, metrics=metrics)
    add_error_handlers(app)
    app.include_router(router)
    app.state.embeddings = embeddings.EmbeddingService(config.model, config.model_name, config.device,
                                                       config.clip_weights, config.index)
    app.include_router(embeddings.router)  # /v1/embeddings, /v1/regions/search
    app.include_router(regions_score.router)  # /v1/regions/classify, /v1/regions/query
    app.include_router(segment_routes.router)
    app.include_router(playground.router)
    app.openapi = lambda: _openapi(app)
    return app


def _server(request: Request) -> ServerState:
    return request.app.state.server


Server = Annotated[ServerState, Depends(_server)]
_ERRORS = ERROR_RESPONSES  # 400 in place of FastAPI's 422 (serve.schemas)
router = APIRouter()
DESCRIBE_MAX_TOKENS = 64  # a describe request's default: a short answer per region


# ---------------------------------------------------------------------------------------------- plain endpoints


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "loading, or failed"}})
async def health(server: Server) -> Response:
    """ok (200) once every engine replica is loaded; loading or error (503) before; each replica's state."""
    engine = server.engine
    replicas = [ReplicaHealth(replica=e.replica, device=device, status=e.status, open_rows=e.open_rows)
                for e, device in zip(engine.engines, engine.devices)]
    body = Health(status=engine.status, error=engine.load_error, replicas=replicas)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if body.status == "ok" else 503)


@router.get("/v1/models")
async def models(server: Server) -> ModelList:
    return ModelList(data=[ModelCard(id=server.config.model_name, created=server.created)])


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus(server: Server) -> Response:
    body, content_type = server.metrics.render()
    return Response(body, media_type=content_type)


# ---------------------------------------------------------------------------------------------- chat completions


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses=_ERRORS | {200: {"content": {"text/event-stream": {}}, "description": "with stream"}})
async def chat_completions(body: ChatCompletionRequest, request: Request, server: Server) -> Response:
    """OpenAI chat completions; regions as `<regionK>` tags bound to `regions`, mask images or the alpha channel."""
    config = server.config
    _check_model(body.model, config)
    conv = parse_messages(body.messages)
    _check_chat_limits(body, conv, config)
    image, masks = await _chat_image_and_masks(conv, body, server)
    bind_regions(conv, len(masks))
    if len(conv.region_order) > config.max_regions:
        raise bad_request(f"the messages mention regions {len(conv.region_order)} times; at most "
                          f"{config.max_regions}", "messages", "too_many_regions")
    job = server.engine.submit(image.image, image.key, _chat_rows(body, conv, masks, config),
                               config.request_timeout_s)
    events, first = await _start(server.engine, job, request)
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
        usage=_usage(results, shared_prompt=True)).model_dump())


def _check_chat_limits(body: ChatCompletionRequest, conv: ChatConversation, config: ServeConfig) -> None:
    """The limits that depend on the server's settings (the fixed rules are in ChatCompletionRequest)."""
    if conv.chars > config.max_prompt_chars:
        raise bad_request(f"the messages hold {conv.chars} characters; at most {config.max_prompt_chars}",
                          "messages", "prompt_too_long")
    if body.n > config.max_n:
        raise bad_request(f"n = {body.n} is more than {config.max_n}", "n")
    _max_tokens(body.max_completion_tokens or body.max_tokens or 0,
                "max_completion_tokens" if body.max_completion_tokens else "max_tokens", config)


def _chat_rows(body: ChatCompletionRequest, conv: ChatConversation, masks: np.ndarray,
               config: ServeConfig) -> list[RowSpec]:
    """One row per choice, each with the regions in `<mask>` order; seeds differ per choice."""
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or min(config.default_chat_max_tokens, config.max_tokens_limit))
    bound = masks[conv.region_order] if conv.region_order else masks[:0]
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    temperature = 0.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return [RowSpec(i, list(conv.turns), bound, _sampling(
        max_tokens, temperature, top_p, None if body.seed is None else body.seed + i, stops))
        for i in range(body.n)]


# ---------------------------------------------------------------------------------------------- native describe


@router.post("/v1/regions/describe", response_model=DescribeResponse,
             responses=_ERRORS | {200: {"content": {"application/x-ndjson": {}}, "description": "with stream"}})
async def describe(body: DescribeRequest, request: Request, server: Server) -> Response:
    """Describe each region of one image with a task prompt; one result per region, in request order."""
    config = server.config
    _check_model(body.model, config)
    if len(body.task) > config.max_prompt_chars:
        raise bad_request(f"task prompt is longer than {config.max_prompt_chars} characters", "task",
                          "prompt_too_long")
    max_tokens = _max_tokens(body.max_tokens or min(DESCRIBE_MAX_TOKENS, config.max_tokens_limit), "max_tokens", config)
    image = await _load_image(body.image, "image", server)
    h, w = image.size_hw
    regions = await asyncio.to_thread(inputs.decode_regions, regions_payload(body.regions), h, w, server.limits,
                                      max_regions=config.max_regions, resize=body.resize_masks)
    params = _sampling(max_tokens, body.temperature, body.top_p, body.seed, ())
    prompt = task_prompt(body.task)
    mentions = prompt.count(REGION_PLACEHOLDER)  # a custom task may name its region more than once
    rows = [RowSpec(i, [("human", prompt)], regions.masks[[i] * mentions], params) for i in range(len(regions.masks))]
    job = server.engine.submit(image.image, image.key, rows, config.request_timeout_s)
    events, first = await _start(server.engine, job, request)
    rid, now = f"desc-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_describe_ndjson(events, first, regions.notes), media_type="application/x-ndjson")
    results = await _collect(events, first)
    return JSONResponse(DescribeResponse(
        id=rid, created=now, model=config.model_name, results=[_region_result(r) for r in results],
        usage=_usage(results), notes=regions.notes).model_dump())


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 it adds to every route with a body (this server answers 400), and with
    this server's limits (model name, max_tokens, regions, n, prompt length), so a client or a fuzzer reads
    from the document what the server accepts."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        models = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            models.pop(name, None)
        _declare_limits(models, app.state.server.config)
        app.openapi_schema = schema
    return app.openapi_schema


def _declare_limits(models: dict[str, Any], config: ServeConfig) -> None:
    limits = {
        "DescribeRequest": {"max_tokens": {"maximum": config.max_tokens_limit},
                            "regions": {"maxItems": config.max_regions}},
        "ChatCompletionRequest": {"max_tokens": {"maximum": config.max_tokens_limit},
                                  "max_completion_tokens": {"maximum": config.max_tokens_limit},
                                  "n": {"maximum": config.max_n}, "regions": {"maxItems": config.max_regions}},
        "ClassifyRequest": {"regions": {"maxItems": config.max_regions}},
        "QueryRequest": {"regions": {"maxItems": config.max_regions}},
    }
    for model, fields in limits.items():
        properties = models.get(model, {}).get("properties", {})
        for field_name, limit in fields.items():
            prop = properties[field_name]
            for branch in prop.get("anyOf", [prop]):  # optional fields: the non-null branch
                if branch.get("type") in ("integer", "array"):
                    branch.update(limit)
        model_field = properties.get("model", {})
        for branch in model_field.get("anyOf", [model_field]):
            if branch.get("type") == "string":
                branch["enum"] = [config.model_name]
    for model in ("DescribeRequest", "ChatCompletionRequest"):  # int64 bounds, exact (the generator writes floats)
        seed = models.get(model, {}).get("properties", {}).get("seed", {})
        for branch in seed.get("anyOf", [seed]):
            if branch.get("type") == "integer":
                branch.update(minimum=-(2**63), maximum=2**63 - 1)
    task = models.get("DescribeRequest", {}).get("properties", {}).get("task", {})
    for branch in task.get("anyOf", []):
        if "pattern" in branch:
            branch["maxLength"] = config.max_prompt_chars


# ---------------------------------------------------------------------------------------------- request helpers


def _check_model(model: str | None, config: ServeConfig) -> None:
    inputs.check_model(model, config)


def _max_tokens(value: int, param: str, config: ServeConfig) -> int:
    if value > config.max_tokens_limit:
        raise bad_request(f"{param} = {value} is more than {config.max_tokens_limit}", param, "max_tokens_too_large")
    return value


_GREEDY_BELOW = 1e-4  # temperatures this small are greedy (dividing logits by ~0 overflows to inf/nan)


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None, stop: tuple[str, ...]
              ) -> SamplingParams:
    temperature = 0.0 if temperature < _GREEDY_BELOW else temperature
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    except ValueError as exc:
        raise bad_request(f"invalid sampling parameters: {exc}", None) from None


async def _load_image(source: str, param: str, server: ServerState) -> inputs.DecodedImage:
    return await inputs.load_image(source, param, server.config, server.limits)


async def _chat_image_and_masks(conv: ChatConversation, body: ChatCompletionRequest,
                                server: ServerState) -> tuple[inputs.DecodedImage, np.ndarray]:
    """The image (first image_url) and the region masks `(Q, H, W) bool`: from `regions`, from extra images
    (their alpha, DAM convention), or from the image's own alpha channel."""
    config, limits = server.config, server.limits
    image = await _load_image(conv.images[0].url, conv.images[0].param, server)
    h, w = image.size_hw
    extra = conv.images[1:]
    if body.regions is not None and extra:
        raise bad_request("give regions either in 'regions' or as extra mask images, not both", "regions")
    if body.regions is not None:
        regions = await asyncio.to_thread(inputs.decode_regions, regions_payload(body.regions), h, w, limits,
                                          max_regions=config.max_regions, resize=body.resize_masks)
        return image, regions.masks
    if len(extra) > config.max_regions:
        raise bad_request(f"too many mask images: {len(extra)} > {config.max_regions}", "messages", "too_many_regions")
    masks = np.zeros((len(extra), h, w), dtype=bool)
    for i, ref in enumerate(extra):
        mask_image = await _load_image(ref.url, ref.param, server)
        masks[i] = inputs.mask_image_region(mask_image.image, h, w, limits, resize=body.resize_masks, param=ref.param)
    if extra:
        return image, masks
    alpha = alpha_mask(image.image)
    if alpha is None:
        return image, masks
    return image, inputs.mask_image_region(image.image, h, w, limits, resize=False,
                                           param=conv.images[0].param)[None]


RowEvents = AsyncIterator[RowText | RowDone]


async def _start(engine: EngineReplicas, job: Job, request: Request) -> tuple[RowEvents, RowText | RowDone]:
    """Wait for the job's first event, so errors found by the worker (bad prompt, timeout) are still HTTP
    statuses, even for streams. Returns the event iterator and that first event."""
    events = engine.events(job, request.is_disconnected)
    try:
        first = await events.__anext__()
    except ClientGone:
        raise APIError(499, "client disconnected", code="client_closed") from None
    return events, first


async def _collect(events: RowEvents, first: RowText | RowDone) -> list[RowResult]:
    results: list[RowResult] = []
    try:
        event = first
        while True:
            if isinstance(event, RowDone):
                results.append(event.result)
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                break
    except ClientGone:
        raise APIError(499, "client disconnected", code="client_closed") from None
    finally:
        await events.aclose()
    return sorted(results, key=lambda r: r.index)


async def _all_events(events: RowEvents, first: RowText | RowDone) -> RowEvents:
    yield first
    async for event in events:
        yield event


def _chat_text(raw: str) -> str:
    text = raw.strip()
    return text[: -len("</s>")].rstrip() if text.endswith("</s>") else text


def _usage(results: list[RowResult], shared_prompt: bool = False) -> Usage:
    """Token counts; the `n` choices of a chat request share one prompt, counted once (as OpenAI does)."""
    prompt = (results[0].prompt_tokens if results else 0) if shared_prompt else sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _region_result(r: RowResult) -> RegionResult:
    return RegionResult(index=r.index, text=clean_answer(r.raw_text), raw_text=r.raw_text,
                        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                        finish_reason=r.finish_reason)


async def _chat_sse(events: RowEvents, first: RowText | RowDone, rid: str, created: int, model: str, n: int,
                    include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events; an error after the stream began is sent as an error event."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        data = ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {data.model_dump_json(exclude_none=False)}\n\n"

    results: list[RowResult] = []
    try:
        yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
        async for event in _all_events(events, first):
            if isinstance(event, RowText):
                yield chunk([ChunkChoice(index=event.index, delta=Delta(content=event.text))])
            else:
                results.append(event.result)
                yield chunk([ChunkChoice(index=event.result.index, delta=Delta(),
                                         finish_reason=event.result.finish_reason)])
        if include_usage:
            yield chunk([], _usage(results, shared_prompt=True))
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except ClientGone:
        return
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


async def _describe_ndjson(events: RowEvents, first: RowText | RowDone, notes: list[str]) -> AsyncIterator[str]:
    results: list[RowResult] = []
    try:
        async for event in _all_events(events, first):
            if isinstance(event, RowDone):
                results.append(event.result)
                yield _region_result(event.result).model_dump_json() + "\n"
        yield json.dumps({"usage": _usage(results).model_dump(), "notes": notes, "done": True}) + "\n"
    except APIError as exc:
        yield json.dumps(exc.body()) + "\n"
    except ClientGone:
        return
    finally:
        await events.aclose()
