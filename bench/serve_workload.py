"""The serving benchmark's workload and its drivers: the official flow, our engine in-process, and the HTTP server.

Every driver runs the same closed loop: I clients, each sending its images in turn (M boxes each, the short-caption
prompt) and the next one once every region of the last is answered.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from osprey.generation import SamplingParams
from osprey.inference import OspreyPipeline
from osprey.prompts import task_prompt

REPO = Path(__file__).resolve().parent.parent  # where `python -m bench.http_clients` resolves

HEIGHT, WIDTH = 480, 640


@dataclass(frozen=True)
class Request:
    image: Image.Image
    boxes: list[list[int]]  # xywh, the regions (masks are these boxes filled)

    @property
    def masks(self) -> np.ndarray:
        masks = np.zeros((len(self.boxes), HEIGHT, WIDTH), bool)
        for q, (x, y, w, h) in enumerate(self.boxes):
            masks[q, y:y + h, x:x + w] = True
        return masks

    def png_b64(self) -> str:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Workload:
    clients: list[list[Request]]  # per client, the images it sends in turn

    @property
    def masks_per_image(self) -> int:
        return len(self.clients[0][0].boxes)

    @property
    def images_in_flight(self) -> int:
        return len(self.clients)

    @property
    def regions(self) -> int:
        return sum(len(r.boxes) for c in self.clients for r in c)


@dataclass
class Measurement:
    system: str
    masks_per_image: int
    images_in_flight: int
    new_tokens: int
    replicas: int = 1  # the server systems: engine replicas, one per device (`osprey serve --devices`)
    tensor_parallel: int = 1  # vllm-osprey: the GPUs one vLLM engine spans (vLLM's tensor_parallel_size)
    seconds: float = 0.0
    region_latencies: list[float] = field(default_factory=list)
    request_latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    peak_mem_gb: float | None = None
    # in-process engine: wall seconds in sending (image encoding + region prompts), in steps that prefilled, and in
    # pure decoding steps; the server: its workers' seconds admitting, stepping and waiting (worker_*); where a
    # configuration's time goes before a profile is taken
    phases_s: dict[str, float] = field(default_factory=dict)

    @property
    def regions_per_s(self) -> float:
        return len(self.region_latencies) / self.seconds


def make_workload(images_in_flight: int, masks: int, waves: int, seed: int) -> Workload:
    """Images of coloured rectangles (they compress like photos, not like noise) with random boxes."""
    rng = np.random.default_rng(seed)
    return Workload([[_request(rng, masks) for _ in range(waves)] for _ in range(images_in_flight)])


def _request(rng: np.random.Generator, masks: int) -> Request:
    image = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, WIDTH - 40)), int(rng.integers(0, HEIGHT - 40))
        draw.rectangle([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                       fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    boxes = []
    for _ in range(masks):
        w, h = int(rng.integers(8, 160)), int(rng.integers(8, 160))
        boxes.append([int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h)), w, h])
    return Request(image, boxes)


# Region counts of the warm-up images, one alone then two: each new decoding step shape records its CUDA graph (and,
# with the fast kernels, may compile) the first time it comes up, which is start-up work, not a measurement's.
WARM_UP_REGIONS = (1, 2)


def warm_up_workload(regions: int, images: int = 1) -> Workload:
    """`images` clients each sending one image of `regions` regions (the same images whoever warms up)."""
    return make_workload(images, regions, 1, seed=97 + regions)


SHAPE_WARM_UP_SEED = 7919  # the images of the warm-up wave (the measured ones use other seeds)


def shape_warm_up(workload: Workload) -> Workload:
    """One wave of the measured configuration on other images (another seed): the decoding-step shapes (CUDA graphs
    recorded per engine), the vision tower's batch size and the kernels' specialisations it needs come up here, not
    in the timed run."""
    return make_workload(workload.images_in_flight, workload.masks_per_image, 1, seed=SHAPE_WARM_UP_SEED)


def build_pipeline(preset: str, model: str | None, device: str, dtype: str | None) -> OspreyPipeline:
    from bench.describe_speed import build_pipeline as build

    args = argparse.Namespace(preset=preset, model=model, device=device, dtype=dtype, regions=512)
    return build(args)


def git_commit() -> str | None:
    """The short commit of the tree the benchmark runs from (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip() or None
    except OSError:
        return None


def summarize(m: Measurement) -> dict:
    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    return {"system": m.system, "masks_per_image": m.masks_per_image, "images_in_flight": m.images_in_flight,
            "replicas": m.replicas, "tensor_parallel": m.tensor_parallel, "regions": len(m.region_latencies), "seconds": m.seconds, "regions_per_s": m.regions_per_s,
            "output_tokens_per_s": m.regions_per_s * m.new_tokens,
            "p50_region_s": pct(m.region_latencies, 50), "p99_region_s": pct(m.region_latencies, 99),
            "p50_request_s": pct(m.request_latencies, 50), "p99_request_s": pct(m.request_latencies, 99),
            "ttft_s": pct(m.ttfts, 50), "peak_mem_gb": m.peak_mem_gb, **({"phases_s": m.phases_s} if m.phases_s else {})}


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- official flow


def run_official(pipe: OspreyPipeline, workload: Workload, new_tokens: int) -> Measurement:
    """One region per call, the image re-encoded each time, HF `generate` at batch 1 (bench.describe_speed)."""
    from bench.describe_speed import official_flow

    request = workload.clients[0][0]
    official_flow(pipe, request.image, request.masks[:1], 2)  # warm-up
    _reset_memory(pipe.device)
    seconds = official_flow(pipe, request.image, request.masks, new_tokens)
    per_region = seconds / len(request.boxes)
    return Measurement("official", 1, 1, new_tokens, seconds, [per_region] * len(request.boxes),
                       [per_region] * len(request.boxes), [], _peak_memory(pipe.device))


# ---------------------------------------------------------------------------------------------- engine in-process


@dataclass
class _Client:
    requests: list[Request]
    started: float = 0.0
    remaining: int = 0
    first_token: bool = False


def run_engine(pipe: OspreyPipeline, workload: Workload, new_tokens: int, max_rows: int,
               kv_cache_gb: float | None, fast_kernels: bool = False) -> Measurement:
    """The closed loop on `OspreyPipeline`'s decode session (what the server's worker thread runs); with
    `fast_kernels`, the system is named `engine-fast`."""
    session = pipe.session(pipe.engine_pool(max_rows, new_tokens + 256, kv_cache_gb), fast_kernels=fast_kernels)
    for warm_up in [warm_up_workload(regions) for regions in WARM_UP_REGIONS] + [shape_warm_up(workload)]:
        _drive(pipe, session, warm_up, new_tokens, Measurement("warm-up", 1, 1, new_tokens))
    m = Measurement("engine-fast" if fast_kernels else "engine", workload.masks_per_image, workload.images_in_flight,
                    new_tokens)
    _reset_memory(pipe.device)
    _drive(pipe, session, workload, new_tokens, m)
    m.peak_mem_gb = _peak_memory(pipe.device)
    return m


def _drive(pipe: OspreyPipeline, session, workload: Workload, new_tokens: int, m: Measurement) -> None:
    params = SamplingParams(max_new_tokens=new_tokens)
    clients = [_Client(list(reqs)) for reqs in workload.clients]
    start = time.perf_counter()

    phases = m.phases_s = {"send": 0.0, "prefill_steps": 0.0, "decode_steps": 0.0}

    def send(indices: list[int]) -> None:
        """The next image of each of these clients, encoded together (as the server's worker encodes what queued
        while it stepped)."""
        sent = time.perf_counter()
        requests = [clients[index].requests.pop(0) for index in indices]
        for index, request in zip(indices, requests):
            client = clients[index]
            client.started, client.remaining, client.first_token = sent, len(request.boxes), False
        for index, request, encoded in zip(indices, requests, pipe.encode_images([r.image for r in requests])):
            prompts = pipe.prepare_each(encoded, [("human", task_prompt("short"))], request.masks)
            ids: list[Hashable] = [(index, q) for q in range(len(prompts))]
            session.add(pipe.group_requests(prompts, [params] * len(prompts), row_ids=ids))
        phases["send"] += time.perf_counter() - sent

    send(list(range(len(clients))))
    while session.has_work:
        prefills, stepped = bool(session.decoder.waiting), time.perf_counter()
        events = session.step()
        now = time.perf_counter()
        phases["prefill_steps" if prefills else "decode_steps"] += now - stepped
        answered = []
        for event in events:
            client = clients[event.row[0]]
            if not client.first_token:
                client.first_token = True
                m.ttfts.append(now - client.started)
            if event.finished:
                m.region_latencies.append(now - client.started)
                client.remaining -= 1
                if client.remaining == 0:
                    m.request_latencies.append(now - client.started)
                    if client.requests:
                        answered.append(event.row[0])
        if answered:
            send(answered)
    _sync(pipe.device)
    m.seconds = time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the HTTP server


def run_server(pipes: list[OspreyPipeline], workload: Workload, new_tokens: int, max_rows: int,
               kv_cache_gb: float | None, fast_kernels: bool = False) -> Measurement:
    """`osprey serve`'s app (real uvicorn on loopback, in this process) with concurrent HTTP clients (in a process of
    their own, bench/http_clients.py), one engine replica per pipeline (`osprey serve --devices`); with
    `fast_kernels` (`osprey serve --fast-kernels`), the system is named `server-fast`. Peak memory: the largest of
    the devices'."""
    from serve.background import BackgroundServer
    from serve.config import ServeConfig
    from serve.engine import PipelineBackend

    devices = tuple(str(pipe.device) for pipe in pipes)
    config = ServeConfig(model="bench", devices=devices, max_batch_size=max_rows, kv_cache_gb=kv_cache_gb,
                         max_tokens_limit=new_tokens, max_row_tokens=new_tokens + 256, max_queue=4096,
                         max_regions=max(64, workload.masks_per_image), request_timeout_s=3600.0, batch_wait_ms=2.0,
                         fast_kernels=fast_kernels)
    backends = [PipelineBackend("bench", device, size=config.engine_size, pipeline=pipe)
                for device, pipe in zip(devices, pipes)]
    m = Measurement("server-fast" if fast_kernels else "server", workload.masks_per_image, workload.images_in_flight,
                    new_tokens, replicas=len(pipes))
    with BackgroundServer(config, backends) as server:
        # the engine's warm-up on every replica: one image per replica with one region, then two per replica with two
        # (sent at once, the least-loaded dispatch gives each replica its share)
        for regions in WARM_UP_REGIONS:
            _http_clients(server.url, warm_up_workload(regions, images=regions * len(pipes)), new_tokens,
                          Measurement("warm-up", 1, 1, new_tokens))
        _http_clients(server.url, shape_warm_up(workload), new_tokens, Measurement("warm-up", 1, 1, new_tokens))
        cold = [engine.replica for engine in server.engine.engines if not engine.metrics.registry.get_sample_value(
            "osprey_replica_requests_total", {"replica": str(engine.replica)})]
        if cold:
            print(f"warning: replicas {cold} got no warm-up request; their first batches are timed cold")
        for pipe in pipes:
            _reset_memory(pipe.device)
        before = _worker_seconds(server.engine.engines)
        _http_clients(server.url, workload, new_tokens, m)
        busy = {phase: seconds - before[phase] for phase, seconds in _worker_seconds(server.engine.engines).items()}
        # the workers' time in the measured window (summed over replicas): admitting requests, decoding steps, and
        # the rest, waiting for requests (the engine's own phases are send / prefill_steps / decode_steps)
        m.phases_s = {"worker_admit": busy["admit"], "worker_steps": busy["step"],
                      "worker_idle": m.seconds * len(pipes) - busy["admit"] - busy["step"]}
        peaks = [_peak_memory(pipe.device) for pipe in pipes]
        m.peak_mem_gb = None if None in peaks else max(peaks)
    for backend in backends:
        del backend.session  # free the server's KV pools before the next configuration
    return m


def _worker_seconds(engines) -> dict[str, float]:
    """Each phase's `osprey_worker_seconds_total`, summed over the replicas' workers."""
    return {phase: sum(engine.metrics.registry.get_sample_value(
        "osprey_worker_seconds_total", {"replica": str(engine.replica), "phase": phase}) or 0.0 for engine in engines)
        for phase in ("admit", "step")}


def _http_clients(url: str, workload: Workload, new_tokens: int, m: Measurement) -> None:
    """The workload's clients against the server at `url`, from a separate process (bench/http_clients.py says
    why); their times go into `m`."""
    bodies = [[{"image": r.png_b64(), "regions": [{"box": b} for b in r.boxes], "task": "short",
                "max_tokens": new_tokens, "stream": True} for r in client] for client in workload.clients]
    done = subprocess.run([sys.executable, "-m", "bench.http_clients", url], input=json.dumps({"clients": bodies}),
                          capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the HTTP clients failed: {done.stderr.strip()[-2000:]}")
    times = json.loads(done.stdout)
    m.seconds = times["seconds"]
    m.region_latencies += times["region_latencies"]
    m.request_latencies += times["request_latencies"]
