"""Custom Keras layers of the Vision Transformer (keras-io seed architecture).

Each layer takes ``**kwargs``, builds its sub-layers in ``__init__``/``build`` and
returns every init argument from ``get_config()``, so a saved ``.keras`` file
reloads to identical predictions.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

PACKAGE = "vit_pipeline"


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
        num_patches: Number of patches per image (sequence length).
        projection_dim: Width of the embeddings.
    """

    def __init__(self, num_patches: int, projection_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = num_patches
        self.projection_dim = projection_dim
        self.projection = layers.Dense(projection_dim, name="projection")
        self.position_embedding = layers.Embedding(num_patches, projection_dim, name="position_embedding")

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] != self.num_patches:
            raise ValueError(
                "Expected the input to hold num_patches patches. "
                f"Received: num_patches={self.num_patches}, input_shape={tuple(input_shape)}"
            )
        self.projection.build(input_shape)
        self.position_embedding.build((None, self.num_patches))
        super().build(input_shape)

    def call(self, patches):
        positions = ops.expand_dims(ops.arange(0, self.num_patches), axis=0)
        return self.projection(patches) + self.position_embedding(positions)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], self.projection_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "num_patches": self.num_patches,
            "projection_dim": self.projection_dim,
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
