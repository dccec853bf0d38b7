"""Training-only batch augmentation in the input pipeline (never in the model).

RandAugment, random erasing, MixUp and CutMix come from Keras' own preprocessing
layers, which are safe inside ``tf.data`` whatever the backend. They run on the
raw 0-255 batches before the model, so an exported graph can never contain them
(the in-model flip/rotation/zoom of the seed are inactive at ``training=False``).
"""

from __future__ import annotations

from collections.abc import Callable

from vit_pipeline.config import PipelineConfig


def model_batch(images, labels, cfg: PipelineConfig, num_classes: int):
    """float32 images; one-hot labels when the loss needs them (``cfg.soft_labels``)."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if cfg.soft_labels:
        labels = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
    return images, labels


def batch_augmenter(cfg: PipelineConfig, num_classes: int) -> Callable | None:
    """A ``(images, labels) -> (images, labels)`` function for ``Dataset.map``.

    Args:
        cfg: Recipe (``rand_augment_*``, ``random_erasing``, ``mixup_alpha``,
            ``cutmix_alpha``, ``label_smoothing``).
        num_classes: Width of the one-hot labels.

    Returns:
        None when the recipe has no batch augmentation and hard labels suffice.
        Images are float32 in 0-255; labels are one-hot float32 when
        ``cfg.soft_labels`` (MixUp/CutMix mix them), else the int labels.
    """
    import keras
    import tensorflow as tf

    stages = []
    if cfg.rand_augment_ops > 0:
        stages.append(
            keras.layers.RandAugment(
                value_range=(0, 255),
                num_ops=cfg.rand_augment_ops,
                factor=cfg.rand_augment_factor,
                seed=cfg.seed,
            )
        )
    if cfg.random_erasing > 0:
        # A fixed (p, p) range: Keras samples the probability in [0, factor] otherwise.
        p = cfg.random_erasing
        stages.append(keras.layers.RandomErasing(factor=(p, p), value_range=(0, 255), seed=cfg.seed + 1))
    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(keras.layers.MixUp(alpha=cfg.mixup_alpha, seed=cfg.seed + 2))
    if cfg.cutmix_alpha > 0:
        mixers.append(keras.layers.CutMix(factor=cfg.cutmix_alpha, seed=cfg.seed + 3))
    if not stages and not mixers and not cfg.soft_labels:
        return None
    switch = tf.random.Generator.from_seed(cfg.seed + 4)

    def augment(images, labels):
        images, labels = model_batch(images, labels, cfg, num_classes)
        for layer in stages:
            images = layer(images, training=True)
        if mixers:
            batch = {"images": images, "labels": labels}
            if len(mixers) == 1:
                mixed = mixers[0](batch, training=True)
            else:  # DeiT: MixUp or CutMix per batch, equal odds
                mixed = tf.cond(
                    switch.uniform(()) < 0.5,
                    lambda: mixers[0](batch, training=True),
                    lambda: mixers[1](batch, training=True),
                )
            images, labels = mixed["images"], mixed["labels"]
        # Augmenters may return float64 or values a hair outside 0-255.
        return tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0), tf.cast(labels, tf.float32)

    return augment
