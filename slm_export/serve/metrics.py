"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own (so servers
in one process, as in tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slm_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.tokens_generated = Counter("slm_tokens_generated", "Tokens generated, all requests", registry=r)
        self.time_to_first_token = Histogram(
            "slm_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "slm_inter_token_latency_seconds", "Between a request's successive tokens",
            buckets=LATENCY_BUCKETS, registry=r)
        self.running_rows = Gauge("slm_running_rows", "Rows in the running batch", registry=r)
        self.queue_depth = Gauge("slm_queue_depth", "Requests waiting to join the batch", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
