"""Load test for the region server: N concurrent clients for a fixed time against a loopback server.

    python -m bench.load                                   # starts a server on a fresh tiny model (CPU)
    python -m bench.load --model DIR --concurrency 8       # starts `osprey serve --model DIR`
    python -m bench.load --url http://127.0.0.1:8000       # targets a running server (loopback only)

Reports requests/s, p50/p90/p99 latency, errors, generated tokens/s, and checks that every request got
exactly one complete, well-formed answer (JSON body, NDJSON stream with each region once and one final
line, or an SSE stream with one finish per choice and a single trailing [DONE]). 429s are counted apart:
a correct answer from a full server. Bounded: at most --duration seconds and --max-requests requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from serve.background import listening_socket

MAX_CONCURRENCY, MAX_DURATION_S, MAX_REQUESTS = 64, 600.0, 100_000
MODES = ("describe", "describe-stream", "chat", "chat-stream")


@dataclass
class Outcome:
    mode: str
    status: int
    latency_s: float
    ok: bool
    problem: str = ""
    completion_tokens: int = 0


@dataclass
class Report:
    url: str
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    rejected_429: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    completion_tokens_per_s: float
    mean_batch_size: float | None
    problems: dict[str, int] = field(default_factory=dict)
    per_mode: dict[str, dict[str, float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- requests


def make_images(count: int, seed: int) -> list[tuple[str, int, int]]:
    """A few distinct PNG images (base64, height, width): some requests share an image (cache), some don't."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = 96 + 16 * i, 128
        buf = io.BytesIO()
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append((base64.b64encode(buf.getvalue()).decode(), h, w))
    return out


def regions_for(h: int, w: int, count: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(count):
        bw, bh = rng.randint(8, w // 2), rng.randint(8, h // 2)
        out.append({"box": [rng.randint(0, w - bw), rng.randint(0, h - bh), bw, bh]})
    return out


def build_request(mode: str, image: tuple[str, int, int], args: argparse.Namespace, rng: random.Random
                  ) -> tuple[str, dict]:
    b64, h, w = image
    regions = regions_for(h, w, args.regions, rng)
    if mode.startswith("describe"):
        return "/v1/regions/describe", {"image": b64, "regions": regions, "max_tokens": args.max_tokens,
                                        "task": "short", "stream": mode.endswith("stream")}
    text = "Describe " + " and ".join(f"<region{i + 1}>" for i in range(len(regions))) + "."
    body = {"model": args.model_name, "max_tokens": args.max_tokens, "regions": regions,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                {"type": "text", "text": text}]}]}
    if mode.endswith("stream"):
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", body


# ---------------------------------------------------------------------------------------------- answer checks


class Malformed(Exception):
    pass


def check_describe(body: dict, regions: int) -> int:
    results = body.get("results")
    if body.get("object") != "region.description" or not isinstance(results, list):
        raise Malformed("describe: no results")
    if sorted(r.get("index") for r in results) != list(range(regions)):
        raise Malformed("describe: result indexes are not exactly 0..N-1")
    for r in results:
        if not isinstance(r.get("text"), str) or r.get("finish_reason") not in ("stop", "length"):
            raise Malformed("describe: bad result")
    usage = body.get("usage") or {}
    if usage.get("completion_tokens") != sum(r["completion_tokens"] for r in results):
        raise Malformed("describe: usage does not add up")
    return usage["completion_tokens"]


def check_ndjson(lines: list[str], regions: int) -> int:
    objs = [json.loads(line) for line in lines if line.strip()]
    if not objs or objs[-1].get("done") is not True or any(o.get("done") for o in objs[:-1]):
        raise Malformed("ndjson: missing or misplaced final done line")
    if sorted(o.get("index") for o in objs[:-1]) != list(range(regions)):
        raise Malformed("ndjson: each region must appear exactly once")
    return int(objs[-1]["usage"]["completion_tokens"])


def check_chat(body: dict) -> int:
    choices = body.get("choices")
    if body.get("object") != "chat.completion" or not choices or len(choices) != 1:
        raise Malformed("chat: expected one choice")
    if not isinstance(choices[0]["message"].get("content"), str) or choices[0].get("finish_reason") not in ("stop", "length"):
        raise Malformed("chat: bad choice")
    return int(body["usage"]["completion_tokens"])


def check_sse(lines: list[str]) -> int:
    events = [line for line in lines if line.strip()]
    if not events or events[-1] != "data: [DONE]" or events.count("data: [DONE]") != 1:
        raise Malformed("sse: must end with exactly one [DONE]")
    finishes, usage = 0, None
    for event in events[:-1]:
        if not event.startswith("data: "):
            raise Malformed("sse: line without 'data: '")
        chunk = json.loads(event[6:])
        if "error" in chunk:
            raise Malformed(f"sse: error event {chunk['error'].get('code')}")
        finishes += sum(1 for c in chunk["choices"] if c.get("finish_reason"))
        usage = chunk.get("usage") or usage
    if finishes != 1 or usage is None:
        raise Malformed("sse: expected one finish and a usage chunk")
    return int(usage["completion_tokens"])


async def one_request(http: httpx.AsyncClient, mode: str, path: str, body: dict, regions: int) -> Outcome:
    started = time.perf_counter()
    try:
        if body.get("stream"):
            async with http.stream("POST", path, json=body) as response:
                status = response.status_code
                lines = [line async for line in response.aiter_lines()] if status == 200 else []
                if status != 200:
                    await response.aread()
                    payload = response.json()
        else:
            response = await http.post(path, json=body)
            status, payload = response.status_code, response.json()
        latency = time.perf_counter() - started
        if status == 429:
            return Outcome(mode, status, latency, ok=False, problem="429")
        if status != 200:
            return Outcome(mode, status, latency, ok=False, problem=f"http {status}: {payload['error']['code']}")
        if mode == "describe":
            tokens = check_describe(payload, regions)
        elif mode == "describe-stream":
            tokens = check_ndjson(lines, regions)
        elif mode == "chat":
            tokens = check_chat(payload)
        else:
            tokens = check_sse(lines)
        return Outcome(mode, status, latency, ok=True, completion_tokens=tokens)
    except (Malformed, json.JSONDecodeError, KeyError, TypeError) as exc:
        return Outcome(mode, 200, time.perf_counter() - started, ok=False, problem=f"malformed: {exc}")
    except httpx.HTTPError as exc:
        return Outcome(mode, 0, time.perf_counter() - started, ok=False, problem=f"transport: {type(exc).__name__}")


async def run_load(args: argparse.Namespace, url: str) -> tuple[list[Outcome], float]:
    images = make_images(args.images, args.seed)
    modes = MODES if args.mode == "mixed" else (args.mode,)
    budget = {"left": args.max_requests}
    outcomes: list[Outcome] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency)
    started = end = 0.0

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(args.seed * 1000 + worker)
        while time.perf_counter() < end and budget["left"] > 0:
            budget["left"] -= 1
            mode = modes[rng.randrange(len(modes))]
            path, body = build_request(mode, images[rng.randrange(len(images))], args, rng)
            outcome = await one_request(http, mode, path, body, args.regions)
            outcomes.append(outcome)
            if outcome.problem == "429":
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.request_timeout, limits=limits) as http:
        for mode in modes:  # warm-up (first calls pay one-off costs), not counted
            path, body = build_request(mode, images[0], args, random.Random(-1))
            warm = await one_request(http, mode, path, body, args.regions)
            if not warm.ok:
                raise SystemExit(f"warm-up {mode} request failed: {warm.problem}")
        started = time.perf_counter()
        end = started + args.duration
        await asyncio.gather(*(client(i, http) for i in range(args.concurrency)))
    return outcomes, time.perf_counter() - started


def summarise(outcomes: list[Outcome], elapsed: float, url: str, args: argparse.Namespace,
              mean_batch: float | None) -> Report:
    ok = [o for o in outcomes if o.ok]
    latencies = sorted(o.latency_s * 1000 for o in ok)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else float("nan")

    problems = Counter(o.problem for o in outcomes if not o.ok and o.problem != "429")
    return Report(
        url=url, concurrency=args.concurrency, duration_s=round(elapsed, 2), requests=len(outcomes), ok=len(ok),
        rejected_429=sum(o.problem == "429" for o in outcomes), errors=sum(problems.values()),
        requests_per_s=round(len(ok) / elapsed, 2), p50_ms=pct(0.50), p90_ms=pct(0.90), p99_ms=pct(0.99),
        completion_tokens_per_s=round(sum(o.completion_tokens for o in ok) / elapsed, 1),
        mean_batch_size=mean_batch, problems=dict(problems), per_mode={
            mode: {"ok": len(lat), "p50_ms": round(sorted(lat)[len(lat) // 2], 1)}
            for mode in MODES if (lat := [o.latency_s * 1000 for o in ok if o.mode == mode])})


def mean_batch_size(url: str) -> float | None:
    """From the server's Prometheus histogram (osprey_batch_size_sum / _count)."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    values = {}
    for line in text.splitlines():
        for name in ("osprey_batch_size_sum", "osprey_batch_size_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    count = values.get("osprey_batch_size_count", 0)
    return round(values["osprey_batch_size_sum"] / count, 2) if count else None


# ---------------------------------------------------------------------------------------------- server


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"bench.load only targets loopback servers, not {host!r}")


@contextmanager
def started_server(args: argparse.Namespace) -> Iterator[str]:
    """`osprey serve` in a subprocess on 127.0.0.1 (a fresh tiny model when --model is not given)."""
    with tempfile.TemporaryDirectory(prefix="osprey-load-") as tmp:
        model = args.model
        if model is None:
            from osprey.checkpoint import init_model_folder

            model = str(init_model_folder("tiny", Path(tmp) / "tiny", seed=0))
        listener = listening_socket()  # bound here and inherited: the port is ours before the server starts
        port = listener.getsockname()[1]
        cmd = [sys.executable, "-m", "osprey.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--fd", str(listener.fileno()), "--served-model-name", args.model_name,
               "--device", args.device,
               "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
               "--log-level", "warning"]
        env = dict(os.environ, **({"OSPREY_API_KEY": args.api_key} if args.api_key else {}))
        url = f"http://127.0.0.1:{port}"
        with open(Path(tmp) / "server.log", "w+") as log:
            with listener:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        pass_fds=(listener.fileno(),))
            try:
                wait_healthy(url, proc, log)
                yield url
            finally:
                proc.terminate()  # SIGTERM: uvicorn finishes requests in flight, then the engine drains
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen, log: IO[str], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="target a running loopback server instead of starting one")
    p.add_argument("--model", default=None, help="model folder for the started server (default: a fresh tiny model)")
    p.add_argument("--model-name", default="osprey", help="served model name (started server) / chat 'model'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--api-key", default=os.environ.get("OSPREY_API_KEY"))
    p.add_argument("--concurrency", type=int, default=4, help=f"concurrent clients (max {MAX_CONCURRENCY})")
    p.add_argument("--duration", type=float, default=20.0, help=f"seconds of load (max {MAX_DURATION_S:.0f})")
    p.add_argument("--max-requests", type=int, default=5000, help=f"request cap (max {MAX_REQUESTS})")
    p.add_argument("--mode", default="mixed", choices=("mixed", *MODES))
    p.add_argument("--regions", type=int, default=2, help="regions per request")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--images", type=int, default=3, help="distinct images the clients rotate through")
    p.add_argument("--max-batch-size", type=int, default=8, help="started server's batch size")
    p.add_argument("--max-queue", type=int, default=64, help="started server's queue size")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (1 <= args.concurrency <= MAX_CONCURRENCY and 0 < args.duration <= MAX_DURATION_S
            and 1 <= args.max_requests <= MAX_REQUESTS and args.regions >= 1):
        raise SystemExit("concurrency, duration, max-requests or regions out of bounds (see --help)")
    if args.url:
        require_loopback(args.url)
        server = nullcontext(args.url.rstrip("/"))
    else:
        server = started_server(args)
    with server as url:
        outcomes, elapsed = asyncio.run(run_load(args, url))
        report = summarise(outcomes, elapsed, url, args, mean_batch_size(url))
    print(json.dumps(asdict(report), indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.errors == 0 and report.ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
