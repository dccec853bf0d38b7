"""Multi-device training on one host with ``tf.distribute.MirroredStrategy``.

``distribution_strategy="mirrored"`` replicates the model on every local GPU (or,
without GPUs, on every logical CPU device) and all-reduces the gradients each
step. ``batch_size`` is per replica: the global batch is ``batch_size *
num_replicas``, so adding devices keeps each device's work the same. The learning
rate is not rescaled; change it yourself when the global batch grows.

Multi-worker training (``MultiWorkerMirroredStrategy``) is not offered: with
Keras 3 on TensorFlow it has open upstream bugs (keras-team/keras#20585), so
beyond one host the pipeline scales out by running trials in parallel (the sweep
flow), not by splitting one training across hosts.
"""

from __future__ import annotations

import logging
import os

from vit_pipeline.config import PipelineConfig
from vit_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# Splits the CPU into this many logical devices (before TensorFlow starts), so
# multi-replica code runs for real on a machine without GPUs (tests, CI).
LOGICAL_CPUS_ENV = "VIT_PIPELINE_LOGICAL_CPUS"


def configure_logical_cpus(count: int | None = None) -> int:
    """Splits the physical CPU into ``count`` logical devices (default: from the env).

    Must run before TensorFlow initialises its devices; afterwards it only checks
    that the existing split matches.

    Returns:
        The number of logical CPU devices.

    Raises:
        ConfigError: if TensorFlow already started with another split.
    """
    import tensorflow as tf

    if count is None:
        raw = os.environ.get(LOGICAL_CPUS_ENV, "").strip()
        if not raw:
            return len(tf.config.list_logical_devices("CPU"))
        try:
            count = int(raw)
        except ValueError:
            raise ConfigError(f"Expected {LOGICAL_CPUS_ENV} to be an integer. Received: {raw!r}") from None
    if count < 1:
        raise ConfigError(f"Expected {LOGICAL_CPUS_ENV} >= 1. Received: {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # TensorFlow already initialised its devices in this process
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise ConfigError(
                f"Expected {count} logical CPU devices, but TensorFlow already started with {have}; "
                f"set {LOGICAL_CPUS_ENV} before the process starts TensorFlow"
            ) from None
    return len(tf.config.list_logical_devices("CPU"))


def make_strategy(cfg: PipelineConfig):
    """The ``tf.distribute`` strategy for ``cfg.distribution_strategy``.

    "default" is TensorFlow's no-op strategy (one device). "mirrored" uses every
    GPU, or every logical CPU device when there is no GPU.
    """
    import tensorflow as tf

    configure_logical_cpus()
    if cfg.distribution_strategy == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    if strategy.num_replicas_in_sync == 1:
        log.warning("MirroredStrategy found one device (%s): training runs on one replica", devices[0])
    return strategy
