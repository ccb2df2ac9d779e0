"""Engine lifecycle through the real server: loading (503), load failure, per-request timeout (504), a graceful
shutdown that finishes the requests in flight, and a burst of 1,024 regions at once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import png_b64
from PIL import Image
from serve_helpers import GatedBackend

from serve.background import BackgroundServer
from serve.config import ServeConfig
from serve.engine import EngineSize, PipelineBackend


def payload(regions: int = 1, max_tokens: int = 2, **extra) -> dict:
    image = Image.fromarray((np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8))
    return {"image": png_b64(image), "regions": [{"box": [2, 2, 10, 8]}] * regions,
            "max_tokens": max_tokens} | extra


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


class SteppedBackend(PipelineBackend):
    """The real pipeline backend that, once a step has produced text (so the client has seen output), waits before
    its next step until the test opens `go`, and records the rows each step advanced: the test decides when the
    worker is busy instead of guessing with sleeps."""

    def __init__(self, model: str, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.go = threading.Event()
        self.busy = threading.Event()  # the worker waits for `go` inside a step
        self.rows_per_step: list[set[int]] = []  # per engine step, the row ids that advanced
        self.gated_at = -1  # the index of the step that waited at the gate
        self._text_seen = False

    def step(self):
        if self._text_seen and not self.busy.is_set():
            self.gated_at = len(self.rows_per_step)
            self.busy.set()
            assert self.go.wait(60), "the test never opened the gate"
        events = super().step()
        self.rows_per_step.append({event.row for event in events})
        self._text_seen = self._text_seen or any(event.text_delta for event in events)
        return events


def _wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _metric(server: BackgroundServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_client_disconnect_stops_decoding_and_drops_queued_rows(model_dir):
    """n=8 rows with room for 4: the client hangs up after the first streamed token while the engine waits at its
    gate. Then its 4 running rows leave before the next step and the 4 waiting ones never start. Without the
    engine's cancellation checks, the running rows go on to max_tokens (or EOS) and the waiting ones run too."""
    backend = SteppedBackend(str(model_dir), size=EngineSize(max_rows=4, max_row_tokens=300))
    config = ServeConfig(model=str(model_dir), max_batch_size=4, max_tokens_limit=32)
    chat = {"model": "osprey", "max_tokens": 32, "temperature": 1, "seed": 3, "stream": True, "n": 8,
            "regions": [{"box": [2, 2, 10, 8]}], "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload()["image"]}},
                {"type": "text", "text": "Describe <region1> in detail."}]}]}
    with BackgroundServer(config, [backend]) as server:
        chat["model"] = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first rows have begun; now hang up
        _wait_for(lambda: not server.engine.open_rows, "the server to notice the client is gone")
        backend.go.set()
        follow_up = httpx.post(server.url + "/v1/regions/describe", json=payload())
        assert follow_up.status_code == 200
    started = set().union(*backend.rows_per_step[:backend.gated_at + 1])
    assert started and started <= set(range(4)), backend.rows_per_step  # 4 rows fit; the chat's rows are 0..7
    after_gate = set().union(*backend.rows_per_step[backend.gated_at + 1:])
    assert after_gate == {8}, backend.rows_per_step  # after the gated step, only the follow-up request's row ran


def test_a_full_queue_answers_429_and_every_admitted_request_completes(model_dir):
    """max_queue=2: while the worker is held mid-decode, two requests wait in the queue, the next ones get 429
    with Retry-After, and once the worker goes on every admitted request gets its complete answer."""
    import asyncio

    backend = SteppedBackend(str(model_dir))
    config = ServeConfig(model=str(model_dir), max_batch_size=2, max_queue=2)
    with BackgroundServer(config, [backend]) as server:
        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
            async with httpx.AsyncClient(timeout=60) as http:
                def post():
                    return asyncio.ensure_future(http.post(server.url + "/v1/regions/describe",
                                                           json=payload(regions=2, max_tokens=3)))

                running = post()
                await asyncio.to_thread(_wait_for, backend.busy.is_set, "the first batch")
                queued = [post() for _ in range(2)]
                await asyncio.to_thread(_wait_for, lambda: _metric(server, 'osprey_queue_depth{replica="0"}') == 2, "a full queue")
                refused = [await post() for _ in range(2)]
                backend.go.set()
                return [await running, *[await q for q in queued]], refused

        answered, refused = asyncio.run(scenario())
    for r in refused:
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
    for r in answered:
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()["results"]] == [0, 1]
        assert all(x["completion_tokens"] == 3 or x["finish_reason"] == "stop" for x in r.json()["results"])


def test_the_server_port_is_held_from_construction_to_stop():
    """No bind-then-close: the port a BackgroundServer reports is bound by it before it starts, so nobody else
    can take it in between."""
    from serve.background import listening_socket

    held = listening_socket()
    port = held.getsockname()[1]
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
    held.close()


def test_health_is_503_until_the_model_is_loaded(model_dir):
    backend = GatedBackend(str(model_dir))
    with BackgroundServer(ServeConfig(model=str(model_dir)), [backend], wait_ready=False) as server:
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
        _wait_for(lambda: 'status="499"' in httpx.get(server.url + "/metrics").text, "the 499 to be counted")
        assert 'status="500"' not in httpx.get(server.url + "/metrics").text
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
    while not server.engine.open_rows:  # the request is admitted: now ask the server to stop
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


def test_a_thousand_regions_sent_at_once_all_come_back(model_dir):
    """16 describe requests of 64 regions each (1,024 regions) sent at once to a server with room for 128 rows: the
    burst queues by KV memory and every region gets its answer, in its request's order."""
    backend = PipelineBackend(str(model_dir), size=EngineSize(max_rows=128, max_row_tokens=64))
    config = ServeConfig(model=str(model_dir), max_batch_size=128, max_regions=64, max_tokens_limit=8, max_queue=64)
    rng = np.random.default_rng(5)
    bodies = []
    for _ in range(16):
        corners = rng.integers(0, 12, size=(64, 2))
        boxes = [[int(x), int(y), int(w), int(h)] for (x, y), w, h in
                 zip(corners, rng.integers(4, 16, size=64), rng.integers(4, 10, size=64))]
        bodies.append(payload(max_tokens=2) | {"regions": [{"box": box} for box in boxes]})

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/regions/describe", json=body) for body in bodies))

    with BackgroundServer(config, [backend]) as server:
        responses = asyncio.run(send_all(server.url))
    assert [r.status_code for r in responses] == [200] * 16
    results = [r.json()["results"] for r in responses]
    assert [[item["index"] for item in r] for r in results] == [list(range(64))] * 16
    assert all(item["completion_tokens"] >= 1 for r in results for item in r)
