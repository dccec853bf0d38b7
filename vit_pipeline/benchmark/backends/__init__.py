"""Inference backends behind one small interface (optimum-benchmark style).

A backend wraps one engine running one model file with one setting. The
scenario only calls ``prepare`` (returns a zero-argument callable that runs one
prepared batch: nothing but compute is timed) and ``predict`` (logits for
accuracy and agreement). Every backend names what really ran: ``provider`` is
the engine/device actually used, ``precision`` what it computed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    backend: str  # "keras", "onnxruntime", "openvino"
    provider: str  # what really ran
    variant: str  # which model file
    precision: str  # what the engine computed in
    providers_used: list[str]

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        """Places ``batch`` where the engine wants it; returns a callable that runs it once."""

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Logits for ``images`` (raw pixels), batch by batch."""


def batched(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Applies ``run`` to consecutive float32 batches of ``images`` and stacks the logits."""
    return np.concatenate([run(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
                           for i in range(0, len(images), batch_size)])  # fmt: skip
