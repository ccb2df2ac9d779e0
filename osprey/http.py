"""Talking to a running `osprey serve`: one POST that honours the server's back-pressure (429 / 503 + Retry-After)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["post_json"]


def post_json(client: Any, url: str, body: dict, retries: int = 5) -> dict:
    """POST `body` with an `httpx.Client`; a full queue (429) or a loading server (503) is retried after its
    Retry-After (at most 30 s, `retries` times). An error status raises RuntimeError with the server's message."""
    import httpx  # the serve / eval extras

    for attempt in range(retries + 1):
        try:
            resp = client.post(url, json=body)
        except httpx.TransportError as exc:
            raise RuntimeError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code not in (429, 503) or attempt == retries:
            break
        try:
            wait = min(float(resp.headers.get("Retry-After", 1)), 30.0)
        except ValueError:
            wait = 1.0
        log.warning("%s answered %d; retrying in %.0f s", url, resp.status_code, wait)
        time.sleep(wait)
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):  # not the OpenAI error shape: show the raw body
            message = resp.text[:500]
        raise RuntimeError(f"{url} answered {resp.status_code}: {message}")
    return resp.json()
