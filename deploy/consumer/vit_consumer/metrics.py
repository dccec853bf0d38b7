"""Prometheus metrics of the service (``GET /metrics``), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Requests by code, latency, decode, queue wait, compute, batch sizes, inferences, the model, reloads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vit_consumer_requests",
            "Inference requests (/predict and /v2 infer) by HTTP status code",
            ["code"],
            registry=r,
        )
        self.latency = Histogram("vit_consumer_request_latency_seconds", "Predict request latency, receipt to answer",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram("vit_consumer_queue_wait_seconds", "Time a request waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("vit_consumer_batch_size", "Images per session.run", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.decode = Histogram("vit_consumer_decode_seconds", "Reading a request's images: parse, decode, checks",
                                buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.compute = Histogram("vit_consumer_compute_seconds", "Time of one session.run (a batch)",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.inferences = Counter("vit_consumer_inferences", "Images run through the model", registry=r)
        self.batches = Counter("vit_consumer_batches", "session.run calls", registry=r)
        self.queue_depth = Gauge("vit_consumer_queue_depth", "Requests waiting for a batch", registry=r)
        self.model = Gauge("vit_consumer_model_info", "The model version being served (value 1)",
                           ["source", "version"], registry=r)  # fmt: skip
        self.reloads = Counter(
            "vit_consumer_reloads", "Champion reload attempts by result", ["result"], registry=r
        )
        self.ready = Gauge("vit_consumer_ready", "1 once a model is loaded and warmed up", registry=r)
        self._model_labels: tuple[str, str] | None = None

    def observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.batch_size.observe(size)
        self.compute.observe(seconds)
        self.inferences.inc(size)
        self.batches.inc()
        for wait in waits:
            self.queue_wait.observe(wait)

    def serving(self, source: str, version: str | None) -> None:
        """Marks ``(source, version)`` as the model served now (and only it)."""
        labels = (source, version or "")
        if self._model_labels is not None and self._model_labels != labels:
            self.model.remove(*self._model_labels)
        self.model.labels(*labels).set(1)
        self._model_labels = labels
