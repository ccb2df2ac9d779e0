"""Prometheus metrics on a private registry (several apps in one process, e.g. tests, never collide)."""

from __future__ import annotations

import time


class Metrics:
    """Counters and histograms the engine and the routes update; `render()` is the /metrics body.

    Without prometheus_client (the serve extra) every update is a no-op and /metrics says so.
    """

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            self.enabled = False
            return
        self.enabled = True
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("osprey_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        # per engine replica (one per device, serve.replicas): the label is the replica's index in --devices
        self.queue_depth = prom.Gauge("osprey_queue_depth", "requests admitted and waiting for the worker",
                                      ["replica"], registry=r)
        self.running = prom.Gauge("osprey_running_prompts", "prompts in the batch being decoded", ["replica"],
                                  registry=r)
        self.open_rows = prom.Gauge("osprey_open_rows", "region rows sent to the replica and not yet answered "
                                    "(queued or decoding; a scoring request counts one): what dispatch balances",
                                    ["replica"], registry=r)
        self.dispatched = prom.Counter("osprey_replica_requests", "requests sent to the replica (generation and "
                                       "scoring)", ["replica"], registry=r)
        self.batch_size = prom.Histogram("osprey_batch_size", "prompts per decoding batch", registry=r,
                                         buckets=(1, 2, 4, 8, 16, 32, 64))
        self.latency = prom.Histogram("osprey_request_latency_seconds", "request latency, admission to last byte",
                                      ["endpoint"], registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = prom.Histogram("osprey_time_to_first_token_seconds", "admission to first generated token",
                                   registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.generated_tokens = prom.Counter("osprey_generated_tokens", "tokens generated", ["replica"], registry=r)
        self.prompt_tokens = prom.Counter("osprey_prompt_tokens", "prompt tokens processed", registry=r)
        self.tokens_per_second = prom.Gauge("osprey_tokens_per_second", "generation throughput of the last batch",
                                            ["replica"], registry=r)
        self.worker_seconds = prom.Counter("osprey_worker_seconds", "the replica's worker thread's time: waiting for "
                                           "work (idle; batch_wait included), admitting requests (images through "
                                           "the vision tower, region prompts; admit) and decoding steps (step)",
                                           ["replica", "phase"], registry=r)
        self.image_cache = prom.Counter("osprey_image_cache", "image encodings looked up", ["result"], registry=r)
        self.model_loaded = prom.Gauge("osprey_model_loaded", "1 once the replica's model is loaded", ["replica"],
                                       registry=r)

    def render(self) -> tuple[bytes, str]:
        if not self.enabled:
            return b"# prometheus_client is not installed (pip install 'osprey-regions[serve]')\n", "text/plain"
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST

    def request_done(self, endpoint: str, status: int, started: float) -> None:
        if self.enabled:
            self.requests.labels(endpoint, str(status)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - started)

    def batch_done(self, replica: str, prompts: int, tokens: int, seconds: float) -> None:
        if self.enabled:
            self.batch_size.observe(prompts)
            self.generated_tokens.labels(replica).inc(tokens)
            if seconds > 0:
                self.tokens_per_second.labels(replica).set(tokens / seconds)

    def set(self, name: str, value: float, **labels: str) -> None:
        if self.enabled:
            metric = getattr(self, name)
            (metric.labels(**labels) if labels else metric).set(value)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if self.enabled:
            metric = getattr(self, name)
            (metric.labels(**labels) if labels else metric).inc(value)

    def observe(self, name: str, value: float) -> None:
        if self.enabled:
            getattr(self, name).observe(value)
