"""Custom Keras layers of the Vision Transformer.

The seed's layers (``Patches``, ``PatchEncoder``) and the small-dataset options of
``cifar100-improved``: Shifted Patch Tokenization (``ShiftedImages``), Locality
Self-Attention (``LocalitySelfAttention``), stochastic depth (``DropPath``) and a
class token (``PatchEncoder(class_token=True)``).

Each layer takes ``**kwargs``, builds its sub-layers in ``__init__``/``build`` and
returns every init argument from ``get_config()``, so a saved ``.keras`` file
reloads to identical predictions.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

PACKAGE = "vit_pipeline"


def custom_objects() -> dict:
    """Every custom layer and function of this module by its registered name (``vit_pipeline>Patches``),
    for ``keras.saving.load_model(path, custom_objects=...)`` or ``mlflow.keras.load_model(uri, custom_objects=...)``."""
    return {k: v for k, v in keras.saving.get_custom_objects().items() if k.startswith(f"{PACKAGE}>")}


@keras.saving.register_keras_serializable(package=PACKAGE)
def gelu_erf(x):
    """Exact GELU written with ``erf``: ``0.5 * x * (1 + erf(x / sqrt(2)))``.

    Numerically the same function as ``keras.activations.gelu``, but Keras' own
    version lowers to ``Erfc``, which tf2onnx cannot convert (it writes an invalid
    graph and only logs a warning). ``Erf`` maps to the ONNX ``Erf`` op.
    """
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


@keras.saving.register_keras_serializable(package=PACKAGE)
class Patches(layers.Layer):
    """Cuts images into non-overlapping square patches.

    Input ``(batch, H, W, C)``; output ``(batch, (H/p)*(W/p), p*p*C)``.

    Args:
        patch_size: Side of each patch in pixels; must divide H and W.
    """

    def __init__(self, patch_size: int, **kwargs):
        super().__init__(**kwargs)
        if patch_size <= 0:
            raise ValueError(f"Expected patch_size to be positive. Received: patch_size={patch_size}")
        self.patch_size = patch_size

    def build(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        for name, side in (("height", height), ("width", width)):
            if side is not None and side % self.patch_size:
                raise ValueError(
                    f"Expected patch_size to divide the image {name}. "
                    f"Received: patch_size={self.patch_size}, {name}={side}"
                )
        super().build(input_shape)

    def call(self, images):
        shape = ops.shape(images)
        patches = ops.image.extract_patches(images, size=self.patch_size)
        # extract_patches exports as a Conv in ONNX (unlike tf.image.extract_patches).
        rows = shape[1] // self.patch_size
        cols = shape[2] // self.patch_size
        return ops.reshape(patches, (shape[0], rows * cols, self.patch_size * self.patch_size * shape[3]))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        p = self.patch_size
        return (batch, (height // p) * (width // p), p * p * channels)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchEncoder(layers.Layer):
    """Linear projection of patches plus a learned position embedding.

    Args:
        num_patches: Number of patches per image.
        projection_dim: Width of the embeddings.
        class_token: If True, a learned class token is prepended (ViT/DeiT); the
            sequence is then ``num_patches + 1`` long and token 0 is the class token.
    """

    def __init__(self, num_patches: int, projection_dim: int, class_token: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = num_patches
        self.projection_dim = projection_dim
        self.class_token = bool(class_token)
        self.sequence_length = num_patches + int(self.class_token)
        self.projection = layers.Dense(projection_dim, name="projection")
        self.position_embedding = layers.Embedding(
            self.sequence_length, projection_dim, name="position_embedding"
        )

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] != self.num_patches:
            raise ValueError(
                "Expected the input to hold num_patches patches. "
                f"Received: num_patches={self.num_patches}, input_shape={tuple(input_shape)}"
            )
        self.projection.build(input_shape)
        self.position_embedding.build((None, self.sequence_length))
        if self.class_token:
            self.cls = self.add_weight(
                shape=(1, 1, self.projection_dim), initializer="zeros", name="class_token"
            )
        super().build(input_shape)

    def call(self, patches):
        tokens = self.projection(patches)
        if self.class_token:
            cls = ops.broadcast_to(
                ops.cast(self.cls, tokens.dtype), (ops.shape(tokens)[0], 1, self.projection_dim)
            )
            tokens = ops.concatenate([cls, tokens], axis=1)
        positions = ops.expand_dims(ops.arange(0, self.sequence_length), axis=0)
        return tokens + self.position_embedding(positions)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.sequence_length, self.projection_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "num_patches": self.num_patches,
            "projection_dim": self.projection_dim,
            "class_token": self.class_token,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class Normalization(layers.Normalization):
    """``keras.layers.Normalization`` that reads its adapted statistics from variables.

    The stock layer caches ``mean``/``variance`` as eager tensors after ``adapt``;
    a ``tf.function`` captures those as extra placeholders, and tf2onnx then
    exports them as *graph inputs* that a consumer would have to feed. Reading the
    (non-trainable) variables instead lets the export freeze them into constants.
    Same weights, same parameter count, same results.
    """

    def call(self, inputs):
        if self.input_mean is not None or self.invert:
            return super().call(inputs)
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        mean = ops.cast(ops.reshape(self.adapt_mean, self._broadcast_shape), self.compute_dtype)
        variance = ops.cast(ops.reshape(self.adapt_variance, self._broadcast_shape), self.compute_dtype)
        return (inputs - mean) / ops.maximum(ops.sqrt(variance), keras.config.epsilon())


@keras.saving.register_keras_serializable(package=PACKAGE)
class ShiftedImages(layers.Layer):
    """The image and four copies shifted diagonally by ``shift`` pixels, channel-stacked.

    First half of Shifted Patch Tokenization (Lee et al. 2021, "Vision Transformer
    for Small-Size Datasets"): cutting the output into patches gives every patch
    its neighbours' pixels, widening each token's receptive field. Input
    ``(batch, H, W, C)``, output ``(batch, H, W, 5*C)``; shifted-in pixels are 0.
    Written with Pad and Slice, which export to ONNX as such.

    Args:
        shift: Shift in pixels; the paper uses half the patch size.
    """

    # (down, right) shifts: left-up, right-up, left-down, right-down.
    DIRECTIONS = ((-1, -1), (-1, 1), (1, -1), (1, 1))

    def __init__(self, shift: int, **kwargs):
        super().__init__(**kwargs)
        if shift <= 0:
            raise ValueError(f"Expected shift to be positive. Received: shift={shift}")
        self.shift = shift

    def call(self, images):
        s = self.shift
        height, width = images.shape[1], images.shape[2]
        padded = ops.pad(images, [[0, 0], [s, s], [s, s], [0, 0]])
        copies = [images]
        for dy, dx in self.DIRECTIONS:
            # Content moves by (dy, dx): read the window offset the other way.
            top, left = s - dy * s, s - dx * s
            copies.append(padded[:, top : top + height, left : left + width, :])
        return ops.concatenate(copies, axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], 5 * input_shape[3])

    def get_config(self):
        return {**super().get_config(), "shift": self.shift}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LocalitySelfAttention(layers.Layer):
    """Multi-head self-attention with Locality Self-Attention options (Lee et al. 2021).

    LSA = a learned softmax temperature (initialised to ``sqrt(head_dim)``) and
    diagonal masking (a token does not attend to itself), which sharpens the
    attention of ViTs trained on small datasets. Self-contained (Dense projections,
    MatMul, Softmax) so it exports to plain ONNX ops.

    Args:
        num_heads: Attention heads.
        head_dim: Width of each head.
        dropout: Dropout on the attention weights (training only).
        learned_temperature: Learn the softmax temperature (LSA) instead of the
            fixed ``sqrt(head_dim)``.
        diagonal_mask: Mask each token's attention to itself (LSA).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        learned_temperature: bool = True,
        diagonal_mask: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.learned_temperature = bool(learned_temperature)
        self.diagonal_mask = bool(diagonal_mask)
        inner = num_heads * head_dim
        self.qkv = layers.Dense(3 * inner, name="qkv")
        self.dropout_layer = layers.Dropout(dropout, name="attention_dropout")
        self.output_dense = None  # built in build(): its width is the input's

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.output_dense = layers.Dense(input_shape[-1], name="output")
        self.output_dense.build((*input_shape[:-1], self.num_heads * self.head_dim))
        # Stored as log(temperature): stays positive while it learns.
        self.log_temperature = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(0.5 * math.log(self.head_dim)),
            trainable=self.learned_temperature,
            name="log_temperature",
        )
        super().build(input_shape)

    def call(self, x, training=None):
        batch, length = ops.shape(x)[0], x.shape[1]
        qkv = ops.reshape(self.qkv(x), (batch, length, 3, self.num_heads, self.head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # (3, batch, heads, length, head_dim)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / ops.exp(self.log_temperature)
        if self.diagonal_mask:
            eye = ops.eye(length, dtype="bool")
            # A large finite value, not -inf: softmax stays NaN-free in every runtime.
            scores = ops.where(eye, ops.cast(-1e9, scores.dtype), scores)
        weights = self.dropout_layer(ops.softmax(scores, axis=-1), training=training)
        out = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))
        return self.output_dense(ops.reshape(out, (batch, length, self.num_heads * self.head_dim)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "dropout": self.dropout,
            "learned_temperature": self.learned_temperature,
            "diagonal_mask": self.diagonal_mask,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class DropPath(layers.Layer):
    """Stochastic depth: drops a residual branch for whole samples while training.

    Huang et al. 2016; DeiT and Lee et al. use it in every transformer block. Kept
    samples are scaled by ``1/(1-rate)``. At inference (``training=False``) the
    layer is the identity and adds no op to an exported graph.

    Args:
        rate: Probability of dropping the branch for a sample.
        seed: Seed of the random draws.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Expected rate in [0, 1). Received: rate={rate}")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype))
        return x * mask / keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassTokenOutput(layers.Layer):
    """Token 0 of a sequence: the class token's representation, ``(batch, dim)``.

    A named layer rather than a ``Lambda``, so saved models load in safe mode.
    """

    def call(self, tokens):
        return tokens[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])
