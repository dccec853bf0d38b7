"""The Vision Transformer of the keras-io seed, built from a PipelineConfig."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from vit_pipeline.config import PipelineConfig
from vit_pipeline.layers import Normalization, PatchEncoder, Patches, gelu_erf


def _mlp(x, units: tuple[int, ...], dropout: float, name: str):
    for i, n in enumerate(units):
        x = layers.Dense(n, activation=gelu_erf, name=f"{name}_dense{i}")(x)
        x = layers.Dropout(dropout, name=f"{name}_dropout{i}")(x)
    return x


def build_vit(
    cfg: PipelineConfig,
    num_classes: int,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    train_images: np.ndarray | None = None,
) -> keras.Model:
    """Builds the seed ViT: raw pixels (0-255) in, logits out.

    Normalization and resizing are part of the model, so a consumer feeds raw
    pixels. Random augmentation layers are active only when ``training=True``.

    Args:
        cfg: Architecture and augmentation settings.
        num_classes: Number of output logits.
        input_shape: ``(H, W, 3)`` of the raw images.
        train_images: If given, the Normalization layer is adapted on them
            (the seed adapts on the training images).
    """
    inputs = keras.Input(shape=input_shape, name="images")
    norm = Normalization(name="normalization")
    if train_images is not None:
        norm.adapt(np.asarray(train_images, dtype=np.float32))
    x = norm(inputs)
    x = layers.Resizing(cfg.image_size, cfg.image_size, name="resizing")(x)
    if cfg.random_flip != "none":
        x = layers.RandomFlip(cfg.random_flip, seed=cfg.seed, name="random_flip")(x)
    if cfg.random_rotation > 0:
        x = layers.RandomRotation(cfg.random_rotation, seed=cfg.seed, name="random_rotation")(x)
    if cfg.random_zoom > 0:
        x = layers.RandomZoom(cfg.random_zoom, cfg.random_zoom, seed=cfg.seed, name="random_zoom")(x)
    patches = Patches(cfg.patch_size, name="patches")(x)
    encoded = PatchEncoder(cfg.num_patches, cfg.projection_dim, name="patch_encoder")(patches)
    for b in range(cfg.transformer_layers):
        x1 = layers.LayerNormalization(epsilon=1e-6, name=f"block{b}_ln1")(encoded)
        attn = layers.MultiHeadAttention(
            num_heads=cfg.num_heads,
            key_dim=cfg.projection_dim,  # as in the seed: per-head width = projection_dim
            dropout=cfg.attention_dropout,
            name=f"block{b}_attention",
        )(x1, x1)
        x2 = layers.Add(name=f"block{b}_add1")([attn, encoded])
        x3 = layers.LayerNormalization(epsilon=1e-6, name=f"block{b}_ln2")(x2)
        x3 = _mlp(x3, cfg.transformer_units, cfg.mlp_dropout, name=f"block{b}_mlp")
        encoded = layers.Add(name=f"block{b}_add2")([x3, x2])
    rep = layers.LayerNormalization(epsilon=1e-6, name="head_ln")(encoded)
    rep = layers.Flatten(name="head_flatten")(rep)
    rep = layers.Dropout(cfg.head_dropout, name="head_dropout")(rep)
    features = _mlp(rep, cfg.mlp_head_units, cfg.head_dropout, name="head_mlp")
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs=inputs, outputs=logits, name="vit")


def load_model(path: str) -> keras.Model:
    """Loads a saved ``.keras`` ViT (this module registers the custom layers)."""
    return keras.saving.load_model(path)
