"""Closed-loop HTTP clients of `osprey serve`'s describe route, in a process of their own.

    python -m bench.http_clients URL < clients.json > times.json

stdin: `{"clients": [[body, ...], ...]}`, one list of describe request bodies per client; each client sends its
bodies one after another (the next once the last answer is complete), all clients at once. stdout: `{"seconds",
"region_latencies", "request_latencies"}`, each latency from the request's start to its region's (or its last) line.

The clients run apart from the server because a real server's clients do: in the server's process they would share
its interpreter lock, and the request parsing, streaming and event handling on the client side would be charged to
the server (bench/serve_workload.py's `run_server` starts this module for every configuration).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class ClientTimes:
    seconds: float = 0.0
    region_latencies: list[float] = field(default_factory=list)
    request_latencies: list[float] = field(default_factory=list)


async def run_clients(url: str, clients: list[list[dict]]) -> ClientTimes:
    import httpx

    times = ClientTimes()
    limits = httpx.Limits(max_connections=len(clients) + 4, max_keepalive_connections=len(clients) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600.0, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, bodies, times) for bodies in clients))
        times.seconds = time.perf_counter() - start
    return times


async def _client(http, bodies: list[dict], times: ClientTimes) -> None:
    for body in bodies:
        started = time.perf_counter()
        async with http.stream("POST", "/v1/regions/describe", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()!r}")
            async for line in response.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if "error" in event:
                    raise RuntimeError(f"the server failed a request: {event}")
                if "text" in event:
                    times.region_latencies.append(time.perf_counter() - started)
        times.request_latencies.append(time.perf_counter() - started)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    clients = json.load(sys.stdin)["clients"]
    json.dump(asdict(asyncio.run(run_clients(sys.argv[1], clients))), sys.stdout)


if __name__ == "__main__":
    main()
