"""The Vision Transformer, built from a PipelineConfig.

Defaults build the keras-io seed exactly; the recipe options (class token or
average pooling, Shifted Patch Tokenization, Locality Self-Attention, stochastic
depth) build the small-dataset ViT of ``cifar100-improved``.
"""

from __future__ import annotations

from pathlib import Path

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


def keras_hub_backbone(cfg: PipelineConfig, name: str = "backbone"):
    """A fresh ``keras_hub.models.ViTBackbone`` of the config's architecture (``backbone="keras_hub"``)."""
    import keras_hub

    return keras_hub.models.ViTBackbone(
        image_shape=(cfg.image_size, cfg.image_size, 3),
        patch_size=cfg.patch_size,
        num_layers=cfg.transformer_layers,
        num_heads=cfg.num_heads,
        hidden_dim=cfg.projection_dim,
        mlp_dim=cfg.transformer_units[0],
        dropout_rate=cfg.mlp_dropout,
        attention_dropout=cfg.attention_dropout,
        use_class_token=cfg.pooling == "class_token",
        name=name,
    )


def build_vit(
    cfg: PipelineConfig,
    num_classes: int,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    train_images: np.ndarray | None = None,
    backbone: keras.Model | None = None,
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
        backbone: With ``backbone="keras_hub"``, the ``ViTBackbone`` to use (e.g. one initialised
            from a checkpoint by ``vit_pipeline.finetune``); None builds a fresh one.
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
    if cfg.backbone == "keras_hub":
        # The Keras-Hub encoder ends with its own LayerNorm; token 0 is its class token.
        backbone = backbone or keras_hub_backbone(cfg)
        make_exportable(backbone)
        rep = backbone(x)
        if cfg.pooling == "class_token":
            rep = ClassTokenOutput(name="head_class_token")(rep)
        else:
            rep = layers.GlobalAveragePooling1D(name="head_pool")(rep)
        return _head(rep, cfg, num_classes, inputs)
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
    return _head(rep, cfg, num_classes, inputs)


def _head(rep, cfg: PipelineConfig, num_classes: int, inputs) -> keras.Model:
    rep = layers.Dropout(cfg.head_dropout, name="head_dropout")(rep)
    features = _mlp(rep, cfg.mlp_head_units, cfg.head_dropout, name="head_mlp")
    logits = layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs=inputs, outputs=logits, name="vit")


def make_exportable(model: keras.Layer) -> keras.Layer:
    """Fixes, in place, what keeps a Keras-Hub ViT from a clean tf2onnx export; returns ``model``.

    * Keras' exact ``gelu`` lowers to ``Erfc``, which tf2onnx cannot convert: every Dense gets the
      same function in its erf form (``layers.gelu_erf``).
    * ``ViTPatchingAndEmbedding`` keeps its position ids as an eager tensor made in ``build()``;
      a traced function captures it as an extra graph input. As a NumPy array it is traced as a
      constant instead.

    Keras-Hub's layers rebuild both in ``build()``, so a saved model gets them back on load:
    :func:`load_model` calls this again.
    """
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, layers.Dense) and layer.activation is keras.activations.gelu:
            layer.activation = gelu_erf
        ids = getattr(layer, "position_ids", None)
        if ids is not None and not isinstance(ids, np.ndarray):
            layer.position_ids = np.asarray(keras.ops.convert_to_numpy(ids), dtype=np.int32)
    return model


def keras_config(path: str | Path) -> bytes:
    """The ``config.json`` of a ``.keras`` archive.

    Raises:
        DataError: the file is not a zip archive, or one without a Keras model's config.json.
    """
    import zipfile

    from vit_pipeline.errors import DataError

    try:
        with zipfile.ZipFile(path) as z:
            return z.read("config.json")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"Expected a Keras model file (.keras: a zip archive with config.json). Received: {path} "
                        f"({type(exc).__name__})") from None  # fmt: skip


def load_model(path: str) -> keras.Model:
    """Loads a saved ``.keras`` ViT (this module registers the custom layers; Keras-Hub's when it has them)."""
    uses_keras_hub = b"keras_hub" in keras_config(path)
    if uses_keras_hub:
        import keras_hub  # noqa: F401  (registers its layers for deserialisation)
    import vit_pipeline.optimizer  # noqa: F401  (a fine-tuned model was compiled with its ScaledAdamW)

    return make_exportable(keras.saving.load_model(path))


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
