"""Engine lifecycle through the real server: loading (503), load failure, per-request timeout (504), and a
graceful shutdown that finishes the requests in flight."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from osprey.checkpoint import init_model_folder
from serve.background import BackgroundServer
from serve.config import ServeConfig
from serve.engine import PipelineBackend


def payload(regions: int = 1, max_tokens: int = 2, **extra) -> dict:
    image = Image.fromarray((np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "regions": [{"box": [2, 2, 10, 8]}] * regions,
            "max_tokens": max_tokens} | extra


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_folder("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


class GatedBackend(PipelineBackend):
    """The real pipeline backend whose load waits for the test to open the gate (to observe 'loading')."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.gate = threading.Event()

    def load(self) -> None:
        self.gate.wait(30)
        super().load()


def test_health_is_503_until_the_model_is_loaded(model_dir):
    backend = GatedBackend(str(model_dir))
    with BackgroundServer(ServeConfig(model=str(model_dir)), backend, wait_ready=False) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(server.url + "/v1/regions/describe", json=payload())
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        backend.gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(server.url + "/v1/regions/describe", json=payload()).status_code == 200


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    with BackgroundServer(ServeConfig(model=str(tmp_path / "missing")), wait_ready=False) as server:
        deadline = time.monotonic() + 30
        while server.engine.load_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        r = httpx.post(server.url + "/v1/regions/describe", json=payload())
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"


def test_timeouts_and_stalled_or_abandoned_bodies(model_dir):
    config = ServeConfig(model=str(model_dir), request_timeout_s=0.001, body_timeout_s=0.3)
    with BackgroundServer(config) as server:
        for stream in (False, True):
            r = httpx.post(server.url + "/v1/regions/describe", json=payload(stream=stream))
            assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        head = (b"POST /v1/regions/describe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"image\": ")
        with socket.create_connection((server.host, server.port), timeout=10) as sock:  # stalls mid-body
            sock.sendall(head)
            reply = b""
            while b"body_timeout" not in reply and (chunk := sock.recv(4096)):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply
        with socket.create_connection((server.host, server.port), timeout=10) as sock:  # leaves mid-body
            sock.sendall(head)
        time.sleep(0.2)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'status="500"' not in metrics and 'status="499"' in metrics
        assert httpx.get(server.url + "/health").status_code == 200


def test_graceful_shutdown_finishes_requests_in_flight(model_dir):
    server = BackgroundServer(ServeConfig(model=str(model_dir), max_batch_size=2)).start()
    result: dict = {}

    def call() -> None:
        result["response"] = httpx.post(server.url + "/v1/regions/describe", json=payload(regions=6, max_tokens=16),
                                        timeout=60)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while not server.engine._inflight:  # the request is admitted: now ask the server to stop
        assert time.monotonic() < deadline
        time.sleep(0.005)
    server.stop()
    caller.join(60)
    r = result["response"]
    assert r.status_code == 200 and len(r.json()["results"]) == 6
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


def test_image_urls_only_when_allowed(model_dir, tmp_path):
    import functools
    import http.server

    Image.new("RGB", (32, 24), (200, 10, 10)).save(tmp_path / "red.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with BackgroundServer(ServeConfig(model=str(model_dir), allow_image_urls=True)) as server:
            r = httpx.post(server.url + "/v1/regions/describe", json=payload(image=base + "/red.png"))
            assert r.status_code == 200, r.text
            r = httpx.post(server.url + "/v1/regions/describe", json=payload(image=base + "/missing.png"))
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
    finally:
        files.shutdown()


def test_a_request_larger_than_the_engine_rows_gets_400_and_the_server_keeps_serving(model_dir):
    config = ServeConfig(model=str(model_dir), max_tokens_limit=64, max_row_tokens=80)
    with BackgroundServer(config) as server:
        r = httpx.post(server.url + "/v1/regions/describe", json=payload(max_tokens=64, task="<region> " + "is it red or blue " * 12))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "max_tokens" in r.json()["error"]["message"]
        ok = httpx.post(server.url + "/v1/regions/describe", json=payload(max_tokens=4))
        assert ok.status_code == 200 and len(ok.json()["results"]) == 1
