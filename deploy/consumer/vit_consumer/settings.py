"""The service's limits and batching (no FastAPI needed to read them)."""

from __future__ import annotations

from dataclasses import dataclass

from vit_consumer.classifier import DEFAULT_PIXEL_BUDGET

DEFAULT_MAX_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Settings:
    """Limits and batching of the service; every field is a ``serve`` option.

    ``max_batch_size`` 32: on the 2-core machine of deploy/consumer/README.md the
    seed graph's throughput grows little past batch 32 (that table), while
    latency grows with it.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_inflight_bytes: int = 128 * 2**20
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    timeout_s: float = 10.0
    pixel_budget: int = DEFAULT_PIXEL_BUDGET
    max_json_depth: int = 8
    max_json_numbers: int = 1_048_576
    decode_threads: int = 2
    # ONNX Runtime's threads spin while a run is in progress, never between runs: those
    # cycles belong to HTTP and decoding (vit_consumer.classifier.spin_options).
    spin: str = "run"
    reload_seconds: float = 0.0
    tracking_uri: str | None = None
    providers: tuple[str, ...] | None = None
    # Time the registered serving candidates at start-up and serve the fastest (vit_consumer.candidates).
    choose_candidate: bool = True

    @property
    def choose_for(self) -> tuple[int, ...] | None:
        """Batch sizes the candidates are timed at: a lone request and a full batch."""
        return (1, self.max_batch_size) if self.choose_candidate else None
