"""Keras in a ``tf.function`` (optionally XLA-compiled), inference mode.

``model.predict`` adds ~40 ms of per-call overhead; the ``tf.function`` is the
honest TensorFlow baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vit_pipeline.benchmark.backends import batched


class KerasBackend:
    backend = "keras"

    def __init__(self, model, xla: bool = False):
        import tensorflow as tf

        self.model = model
        self.provider = "tensorflow-xla" if xla else "tensorflow"
        self.variant = "fp32"
        compute = str(getattr(model, "compute_dtype", "float32"))
        self.precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(compute, compute)
        self._fn = tf.function(lambda x: model(x, training=False), jit_compile=xla, reduce_retracing=True)
        self.providers_used = ["tensorflow"]

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        import tensorflow as tf

        x = tf.constant(batch, tf.float32)  # on the default device before timing
        return lambda: self._fn(x).numpy()

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        import tensorflow as tf

        return batched(lambda x: self._fn(tf.constant(x)).numpy(), images, batch_size)
