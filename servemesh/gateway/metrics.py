"""Prometheus metrics of a gateway: calls by transport, endpoint, model and status, and their latency.

The model label carries a model's name only once the gateway has found that model and let the
caller use it: before that the name is the caller's own text (a 404, 401 or 403), and labelling it
would let anyone grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from telemetry.histogram import SECONDS_BUCKETS

__all__ = ["CLIENT_CLOSED", "GatewayMetrics"]

# What a call that its client gave up on counts as (nginx's 499: the client closed the request).
CLIENT_CLOSED = 499


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter("servemesh_gateway_requests", "Calls answered by the gateway.",
                             ["transport", "endpoint", "model", "status"], registry=self.registry)  # fmt: skip
        self.seconds = Histogram("servemesh_gateway_request_seconds", "Time from a call's arrival to its answer.",
                                 ["transport", "endpoint"], buckets=SECONDS_BUCKETS,
                                 registry=self.registry)  # fmt: skip

    def record(self, transport: str, endpoint: str, model: str, status: int, seconds: float) -> None:
        """``model``: the name of a model the gateway found and let the caller use, else ""."""
        self.calls.labels(transport, endpoint, model, str(status)).inc()
        self.seconds.labels(transport, endpoint).observe(seconds)
