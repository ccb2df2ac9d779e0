"""Engine replicas behind one server (serve.replicas): the dispatch rule, queues that pass requests on, and two
replicas on the CPU through the real server: requests spread over both, the answers of one replica, 4xx for bad
input, 503 until every replica has loaded, and a shutdown that drains both; `osprey serve --devices`."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from helpers import png_b64
from PIL import Image
from serve_helpers import GatedBackend

from osprey.generation import SamplingParams
from osprey.prompts import task_prompt
from serve import cli
from serve.background import BackgroundServer
from serve.config import ServeConfig
from serve.engine import Engine, PipelineBackend, RowSpec
from serve.errors import APIError
from serve.metrics import Metrics
from serve.replicas import IMAGE_AFFINITY_ROWS, EngineReplicas, dispatch_order

H, W = 24, 32
REGIONS = [{"box": [2, 2, 10, 8]}, {"box": [12, 6, 16, 14]}]


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8))


def _describe(seed: int, max_tokens: int = 12, regions: list[dict] = REGIONS) -> dict:
    return {"image": png_b64(_image(seed)), "regions": regions, "max_tokens": max_tokens}


def _metric(server: BackgroundServer, sample: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _dispatched(server: BackgroundServer) -> list[float]:
    return [_metric(server, f'osprey_replica_requests_total{{replica="{i}"}}') for i in range(2)]


def _wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- dispatch rule


def test_dispatch_goes_to_the_least_loaded_then_to_the_image_home():
    assert dispatch_order([3, 0, 1], None) == [1, 2, 0]
    assert dispatch_order([0, 0], None) == [0, 1]  # ties: the first device
    assert dispatch_order([0, IMAGE_AFFINITY_ROWS], 1) == [1, 0]  # the replica holding the image, when close
    assert dispatch_order([0, IMAGE_AFFINITY_ROWS + 1], 1) == [0, 1]  # ... but not when far behind
    assert dispatch_order([4], 0) == [0]


def _replicas(pipeline, max_queue: int) -> tuple[EngineReplicas, Metrics]:
    """Two engines on one loaded pipeline whose workers are not started: admitted jobs wait in their queues."""
    metrics = Metrics()
    engines = [Engine(PipelineBackend("tiny", pipeline=pipeline), metrics, replica=i, max_queue=max_queue)
               for i in range(2)]
    return EngineReplicas(engines, ("cpu", "cpu"), metrics), metrics


def _rows(count: int) -> list[RowSpec]:
    masks = np.zeros((1, H, W), bool)
    masks[0, 2:8, 2:10] = True
    return [RowSpec(i, [("human", task_prompt("short"))], masks, SamplingParams(max_new_tokens=2)) for i in range(count)]


def test_an_image_returns_to_its_replica_a_full_queue_passes_it_on_and_429_comes_when_all_are_full(tiny_pipeline):
    replicas, metrics = _replicas(tiny_pipeline, max_queue=2)

    async def scenario():
        with pytest.raises(APIError) as loading:
            replicas.submit(_image(0), "a", _rows(1), 30)
        replicas.engines[0].ready.set()  # one replica loaded: the server still waits for the other
        with pytest.raises(APIError) as half_loaded:
            replicas.submit(_image(0), "a", _rows(1), 30)
        replicas.engines[1].ready.set()
        jobs = [replicas.submit(_image(0), "a", _rows(1), 30),  # both idle: the first replica
                replicas.submit(_image(0), "a", _rows(1), 30),  # image a again: its replica, one row ahead
                replicas.submit(_image(1), "b", _rows(1), 30),  # a new image: the least loaded
                replicas.submit(_image(0), "a", _rows(1), 30)]  # image a's replica is full: passed on
        with pytest.raises(APIError) as full:
            replicas.submit(_image(2), "c", _rows(1), 30)
        return loading.value, half_loaded.value, jobs, full.value

    loading, half_loaded, jobs, full = asyncio.run(scenario())
    assert loading.code == half_loaded.code == "model_loading" and loading.status == 503
    assert [job.replica for job in jobs] == [0, 0, 1, 1]
    assert [e.open_rows for e in replicas.engines] == [2, 2] and replicas.open_rows == 4
    assert (full.status, full.code) == (429, "queue_full")
    assert [metrics.registry.get_sample_value("osprey_replica_requests_total", {"replica": str(i)})
            for i in range(2)] == [2, 2]


def test_a_replica_that_fails_to_load_fails_the_server_naming_its_device(tiny_pipeline, tmp_path):
    metrics = Metrics()
    engines = [Engine(PipelineBackend("tiny", pipeline=tiny_pipeline), metrics, replica=0),
               Engine(PipelineBackend(str(tmp_path / "absent")), metrics, replica=1)]
    replicas = EngineReplicas(engines, ("cpu", "cpu:0"), metrics)
    engines[1].start()
    engines[1]._thread.join(60)
    assert replicas.status == "error" and replicas.load_error.startswith("cpu:0 (replica 1): ")

    async def scenario():
        with pytest.raises(APIError) as refused:
            replicas.submit(_image(0), "a", _rows(1), 30)
        return refused.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (503, "model_load_failed") and "absent" in refused.message
    with pytest.raises(ValueError, match="one engine per device"):
        EngineReplicas(engines, ("cpu",), metrics)


# ---------------------------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """The same model on one replica and on two (both on the CPU)."""
    one = ServeConfig(model=str(tiny_model_dir), served_model_name="tiny", max_batch_size=4, max_tokens_limit=32,
                      max_regions=4, request_timeout_s=60)
    with BackgroundServer(one) as single, BackgroundServer(replace(one, devices=("cpu", "cpu"))) as double:
        yield single, double
        assert 'status="500"' not in httpx.get(double.url + "/metrics").text


async def _post_all(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await asyncio.gather(*(http.post(path, json=body) for body in bodies))


def test_health_and_metrics_list_every_replica(servers):
    _, double = servers
    health = httpx.get(double.url + "/health").json()
    assert health["status"] == "ok"
    assert [(r["replica"], r["device"], r["status"]) for r in health["replicas"]] == [(0, "cpu", "ok"), (1, "cpu", "ok")]
    for replica in ("0", "1"):
        assert _metric(double, f'osprey_model_loaded{{replica="{replica}"}}') == 1
        assert _metric(double, f'osprey_queue_depth{{replica="{replica}"}}') == 0


def test_concurrent_requests_spread_over_both_replicas_with_one_replicas_answers(servers):
    single, double = servers
    bodies = [_describe(seed, max_tokens=16) for seed in range(6)]
    before = _dispatched(double)
    answered = asyncio.run(_post_all(double.url, "/v1/regions/describe", bodies))
    spread = [after - b for after, b in zip(_dispatched(double), before)]
    assert all(r.status_code == 200 for r in answered), [r.text for r in answered]
    assert sum(spread) == 6 and min(spread) >= 1, spread  # both replicas took requests
    expected = asyncio.run(_post_all(single.url, "/v1/regions/describe", bodies))
    assert [[x["raw_text"] for x in r.json()["results"]] for r in answered] == \
        [[x["raw_text"] for x in r.json()["results"]] for r in expected]
    for replica in ("0", "1"):
        assert _metric(double, f'osprey_generated_tokens_total{{replica="{replica}"}}') > 0
    assert [r["open_rows"] for r in httpx.get(double.url + "/health").json()["replicas"]] == [0, 0]  # all answered


def test_chat_and_scoring_answer_as_on_one_replica(servers):
    single, double = servers
    chat = {"model": "tiny", "max_tokens": 10, "regions": REGIONS, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(_image(7))}},
        {"type": "text", "text": "What is <region2> next to <region1>?"}]}]}
    classify = {"image": png_b64(_image(8)), "regions": REGIONS, "labels": ["cat", "red square", "x"]}
    answers = {}
    for server in servers:
        chats = asyncio.run(_post_all(server.url, "/v1/chat/completions", [chat, chat]))
        scores = asyncio.run(_post_all(server.url, "/v1/regions/classify", [classify, classify]))
        assert all(r.status_code == 200 for r in chats + scores), [r.text for r in chats + scores]
        answers[server.url] = ([r.json()["choices"][0]["message"]["content"] for r in chats],
                               [[label["probability"] for result in r.json()["results"] for label in result["labels"]]
                                for r in scores])
    (chat_one, scores_one), (chat_two, scores_two) = answers[single.url], answers[double.url]
    assert chat_two == chat_one
    np.testing.assert_allclose(scores_two, scores_one, atol=1e-6)


def test_bad_requests_are_still_4xx_and_reach_no_replica(servers):
    _, double = servers
    before = _dispatched(double)
    outside = _describe(1, regions=[{"box": [2, 2, 10, 8]}, {"rle": {"size": [H + 1, W], "counts": [0, 5]}}])
    assert httpx.post(double.url + "/v1/regions/describe", json=outside).status_code == 400
    assert httpx.post(double.url + "/v1/regions/describe", json=_describe(1, max_tokens=33)).status_code == 400
    assert httpx.post(double.url + "/v1/regions/describe", json=_describe(1) | {"model": "other"}).status_code == 404
    assert _dispatched(double) == before


def test_503_until_every_replica_has_loaded(tiny_model_dir):
    config = ServeConfig(model=str(tiny_model_dir), devices=("cpu", "cpu"))
    late = GatedBackend(str(tiny_model_dir))
    backends = [PipelineBackend(str(tiny_model_dir)), late]
    with BackgroundServer(config, backends, wait_ready=False) as server:
        _wait_for(lambda: server.engine.engines[0].status == "ok", "the first replica to load")
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert [r["status"] for r in health.json()["replicas"]] == ["ok", "loading"]
        r = httpx.post(server.url + "/v1/regions/describe", json=_describe(0, max_tokens=2))
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        late.gate.set()
        _wait_for(lambda: httpx.get(server.url + "/health").status_code == 200, "both replicas to load")
        assert httpx.post(server.url + "/v1/regions/describe", json=_describe(0, max_tokens=2)).status_code == 200


def test_shutdown_drains_both_replicas(tiny_model_dir):
    config = ServeConfig(model=str(tiny_model_dir), devices=("cpu", "cpu"), max_batch_size=2, max_tokens_limit=32)
    server = BackgroundServer(config).start()
    engines = server.engine.engines
    responses: dict[int, httpx.Response] = {}

    def call(seed: int) -> None:
        body = _describe(seed, max_tokens=32, regions=REGIONS * 2)
        responses[seed] = httpx.post(server.url + "/v1/regions/describe", json=body, timeout=60)

    callers = [threading.Thread(target=call, args=(seed,)) for seed in range(4)]
    for caller in callers:
        caller.start()
    _wait_for(lambda: sum(_dispatched(server)) == 4, "all four requests admitted", timeout_s=10)
    open_rows = [engine.open_rows for engine in engines]
    server.stop()
    assert min(open_rows) > 0, open_rows  # both replicas had work in flight when the server was asked to stop
    for caller in callers:
        caller.join(60)
    assert [responses[seed].status_code for seed in range(4)] == [200] * 4
    assert all(len(responses[seed].json()["results"]) == 4 for seed in range(4))
    assert not server.thread.is_alive() and not any(engine._thread.is_alive() for engine in engines)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_replicas_answer_as_one_gpu(tiny_model_dir):
    """cuda:0 and cuda:1 (the second replica's worker thread makes cuda:1 its current device: CUDA graphs are
    captured there) answer what one replica on cuda:0 answers."""
    one = ServeConfig(model=str(tiny_model_dir), devices=("cuda:0",), dtype="float32", max_tokens_limit=32)
    bodies = [_describe(seed, max_tokens=16) for seed in range(8)]
    answers = []
    for config in (one, replace(one, devices=("cuda:0", "cuda:1"))):
        with BackgroundServer(config) as server:
            responses = asyncio.run(_post_all(server.url, "/v1/regions/describe", bodies))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            answers.append([[x["raw_text"] for x in r.json()["results"]] for r in responses])
            spread = _dispatched(server)
    assert answers[1] == answers[0]
    assert min(spread) >= 1, spread


# ---------------------------------------------------------------------------------------------- osprey serve


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="osprey")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_serve_devices_flag(tiny_model_dir, capsys):
    model = ["serve", "--model", str(tiny_model_dir)]
    with pytest.raises(SystemExit):  # one of --device / --devices
        _parse([*model, "--device", "cpu", "--devices", "cpu", "cpu"])
    assert "not allowed with argument" in capsys.readouterr().err
    args = _parse([*model, "--devices", "cpu", "gpu0"])
    assert args.func(args) == 2 and "invalid device 'gpu0'" in capsys.readouterr().err
    args = _parse([*model, "--devices", "cpu", "cpu", "--backend", "vllm"])
    assert args.func(args) == 2 and "--tensor-parallel-size" in capsys.readouterr().err
