"""HTTP plumbing: the guard middleware (API key, body-size cap, request metrics) and the exception handlers
that give every error OpenAI's shape (FastAPI's 422 validation errors become 400 naming the field)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .errors import APIError, error_body, loc_to_param
from .metrics import Metrics

log = logging.getLogger(__name__)
ENDPOINTS = ("/v1/chat/completions", "/v1/regions/describe", "/v1/models", "/v1/segment", "/v1/segment/everything",
             "/health", "/metrics")


# ---------------------------------------------------------------------------------------------- errors


def add_error_handlers(app: FastAPI) -> None:
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
        code = {"extra_forbidden": "unknown_field", "missing": "missing_field", "invalid_region": "invalid_region"}.get(
            kind, "invalid_value")
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
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
    """Drop pydantic's union markers from an error location: branch names (`str`, `list[str]`, `CocoRLE`) and
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
        if "[" in text or "-" in text or text[:1].isupper() or text in ("str", "int", "float", "bool", "none"):  # branch names
            continue
        out.append(part)
    return out


# ---------------------------------------------------------------------------------------------- middleware


class GuardMiddleware:
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
        endpoint = path if path in ENDPOINTS else "other"
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
            elif body_receive is None:  # the client left while sending its body: nobody to answer
                status["code"] = 499
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
        """Read the whole body up to the cap (413 on Content-Length or once exceeded), then replay it.

        Returns (receive for the app, None), (None, error to send), or (None, None) if the client left."""
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
            try:  # a client that stalls mid-body (slowloris) must not hold a connection forever
                message = await asyncio.wait_for(receive(), timeout=self.config.body_timeout_s)
            except asyncio.TimeoutError:
                return None, APIError(408, f"the request body did not arrive within {self.config.body_timeout_s} s",
                                      code="body_timeout")
            if message["type"] == "http.disconnect":
                return None, None
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
