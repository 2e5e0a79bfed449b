"""Prometheus metrics of a worker, read from its state at scrape time (names a Triton user knows:
request success/failure, queue and compute duration, batch size, pending, loaded models)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from telemetry import tracing
from telemetry.histogram import Histogram
from workers.worker import Worker

__all__ = ["worker_metrics"]

_MV = ["model", "version"]


def _histogram(name: str, doc: str, by: dict[tuple[str, str], Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=_MV)
    for labels, hist in by.items():
        family.add_metric(list(labels), hist.cumulative(), hist.sum)
    return family


class _WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        servers = self.worker.servers
        ok = CounterMetricFamily("servemesh_inference_request_success", "Requests answered with outputs.", labels=_MV)
        failed = CounterMetricFamily(
            "servemesh_inference_request_failure", "Requests answered with an error.", labels=[*_MV, "status"]
        )
        pending = GaugeMetricFamily("servemesh_inference_pending_requests", "Requests held: queued or computing.",
                                    labels=_MV)  # fmt: skip
        loaded = GaugeMetricFamily("servemesh_model_loaded", "1 for each model version loaded here.", labels=_MV)
        load_s = GaugeMetricFamily("servemesh_model_load_duration_seconds", "Artifact to serving.", labels=_MV)
        instances = GaugeMetricFamily("servemesh_model_instances", "Batches a replica may compute at once.",
                                      labels=_MV)  # fmt: skip
        computing = GaugeMetricFamily("servemesh_inference_batches_computing", "Batches in the model now.",
                                      labels=_MV)  # fmt: skip
        for (model, version), server in servers.items():
            ok.add_metric([model, version], server.stats.succeeded)
            by_status = Counter(server.stats.errors)
            by_status[504] += server.stats.expired  # expired in the queue: answered 504, never computed
            for status, count in sorted(by_status.items()):
                failed.add_metric([model, version, str(status)], count)
            pending.add_metric([model, version], server.in_flight)
            loaded.add_metric([model, version], 1)
            load_s.add_metric([model, version], server.load_ms / 1000)
            instances.add_metric([model, version], server.spec.instances)
            computing.add_metric([model, version], server.computing_batches)
        yield from (ok, failed, pending, loaded, load_s, instances, computing)
        stats = {key: server.stats for key, server in servers.items()}
        yield _histogram("servemesh_inference_queue_duration_seconds", "Stored in the stream → batch started.",
                         {k: s.queue_s for k, s in stats.items()})  # fmt: skip
        yield _histogram("servemesh_inference_compute_duration_seconds", "Model time per batch.",
                         {k: s.compute_s for k, s in stats.items()})  # fmt: skip
        yield _histogram("servemesh_inference_batch_size", "Requests per batch.",
                         {k: s.batch_size for k, s in stats.items()})  # fmt: skip
        cache = CounterMetricFamily("servemesh_artifact_cache", "Model loads by artifact cache outcome.",
                                    labels=["result"])  # fmt: skip
        cache.add_metric(["hit"], self.worker.store.hits)
        cache.add_metric(["miss"], self.worker.store.misses)
        yield cache
        ready = GaugeMetricFamily(
            "servemesh_worker_ready", "1 when every assigned model is loaded and none has stopped answering its queue."
        )
        ready.add_metric([], 1 if self.worker.ready else 0)
        yield ready
        spans = tracing.export_counts()
        if spans is not None:
            family = CounterMetricFamily("servemesh_trace_spans", "Spans by export outcome.",
                                         labels=["outcome"])  # fmt: skip
            for outcome, count in spans.items():
                family.add_metric([outcome], count)
            yield family


def worker_metrics(worker: Worker) -> CollectorRegistry:
    """A registry whose every collection reads ``worker`` as it is then (served by telemetry/endpoint.py)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerCollector(worker))
    return registry
