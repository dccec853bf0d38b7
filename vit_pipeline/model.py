"""The Vision Transformer, built from a PipelineConfig.

Defaults build the keras-io seed exactly; the recipe options (class token or
average pooling, Shifted Patch Tokenization, Locality Self-Attention, stochastic
depth) build the small-dataset ViT of ``cifar100-improved``.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from vit_pipeline.config import PipelineConfig
from vit_pipeline.layers import (
    ClassTokenOutput,
    DropPath,
    LocalitySelfAttention,
    Normalization,
    PatchEncoder,
    Patches,
    ShiftedImages,
    gelu_erf,
)


def _mlp(x, units: tuple[int, ...], dropout: float, name: str):
    for i, n in enumerate(units):
        x = layers.Dense(n, activation=gelu_erf, name=f"{name}_dense{i}")(x)
        x = layers.Dropout(dropout, name=f"{name}_dropout{i}")(x)
    return x


def _tokens(x, cfg: PipelineConfig):
    """Patches (optionally shift-augmented, SPT) -> projected tokens + positions."""
    if cfg.patch_tokenization == "shifted":
        x = ShiftedImages(max(1, cfg.patch_size // 2), name="shifted_images")(x)
    patches = Patches(cfg.patch_size, name="patches")(x)
    if cfg.patch_tokenization == "shifted":  # SPT normalises the widened patches
        patches = layers.LayerNormalization(epsilon=1e-6, name="patch_ln")(patches)
    return PatchEncoder(
        cfg.num_patches, cfg.projection_dim, class_token=cfg.pooling == "class_token", name="patch_encoder"
    )(patches)


def _attention(x, cfg: PipelineConfig, name: str):
    head_dim = cfg.head_dim or cfg.projection_dim  # the seed: per-head width = projection_dim
    if cfg.attention_type == "lsa":
        return LocalitySelfAttention(cfg.num_heads, head_dim, dropout=cfg.attention_dropout, name=name)(x)
    return layers.MultiHeadAttention(
        num_heads=cfg.num_heads, key_dim=head_dim, dropout=cfg.attention_dropout, name=name
    )(x, x)


def _drop_path_rates(cfg: PipelineConfig) -> list[float]:
    """Stochastic-depth rate per block, rising linearly from 0 to the configured rate."""
    n = cfg.transformer_layers
    if n == 1:
        return [cfg.stochastic_depth_rate]
    return [cfg.stochastic_depth_rate * b / (n - 1) for b in range(n)]


def build_vit(
    cfg: PipelineConfig,
    num_classes: int,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    train_images: np.ndarray | None = None,
) -> keras.Model:
    """Builds the ViT: raw pixels (0-255) in, logits out.

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
        norm.adapt(_adapt_data(train_images))
    x = norm(inputs)
    if cfg.image_size != input_shape[0] or cfg.image_size != input_shape[1]:
        x = layers.Resizing(cfg.image_size, cfg.image_size, name="resizing")(x)
    if cfg.random_flip != "none":
        x = layers.RandomFlip(cfg.random_flip, seed=cfg.seed, name="random_flip")(x)
    if cfg.random_rotation > 0:
        x = layers.RandomRotation(cfg.random_rotation, seed=cfg.seed, name="random_rotation")(x)
    if cfg.random_zoom > 0:
        x = layers.RandomZoom(cfg.random_zoom, cfg.random_zoom, seed=cfg.seed, name="random_zoom")(x)
    encoded = _tokens(x, cfg)
    drop_rates = _drop_path_rates(cfg)
    for b in range(cfg.transformer_layers):
        x1 = layers.LayerNormalization(epsilon=1e-6, name=f"block{b}_ln1")(encoded)
        attn = _attention(x1, cfg, name=f"block{b}_attention")
        if drop_rates[b] > 0:
            attn = DropPath(drop_rates[b], seed=cfg.seed + b, name=f"block{b}_drop_path1")(attn)
        x2 = layers.Add(name=f"block{b}_add1")([attn, encoded])
        x3 = layers.LayerNormalization(epsilon=1e-6, name=f"block{b}_ln2")(x2)
        x3 = _mlp(x3, cfg.transformer_units, cfg.mlp_dropout, name=f"block{b}_mlp")
        if drop_rates[b] > 0:
            x3 = DropPath(drop_rates[b], seed=cfg.seed + 1000 + b, name=f"block{b}_drop_path2")(x3)
        encoded = layers.Add(name=f"block{b}_add2")([x3, x2])
    rep = layers.LayerNormalization(epsilon=1e-6, name="head_ln")(encoded)
    if cfg.pooling == "flatten":  # the seed: 144*64 features into a 2048-wide Dense
        rep = layers.Flatten(name="head_flatten")(rep)
    elif cfg.pooling == "gap":
        rep = layers.GlobalAveragePooling1D(name="head_pool")(rep)
    else:  # class_token: token 0
        rep = ClassTokenOutput(name="head_class_token")(rep)
    rep = layers.Dropout(cfg.head_dropout, name="head_dropout")(rep)
    features = _mlp(rep, cfg.mlp_head_units, cfg.head_dropout, name="head_mlp")
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs=inputs, outputs=logits, name="vit")


def load_model(path: str) -> keras.Model:
    """Loads a saved ``.keras`` ViT (this module registers the custom layers)."""
    return keras.saving.load_model(path)


def _adapt_data(images):
    """What Normalization adapts on: the array itself, or a sharded split batch by batch."""
    if isinstance(images, np.ndarray):
        return images.astype(np.float32)
    import tensorflow as tf

    def batches(size: int = 256):  # float32 is 4x the shard: convert a few images at a time
        for shard in images.iter_shards():
            for i in range(0, len(shard), size):
                yield shard[i : i + size].astype(np.float32)

    return tf.data.Dataset.from_generator(
        batches, output_signature=tf.TensorSpec((None, *images.shape[1:]), tf.float32)
    )
