"""AdamW with a learning-rate scale per variable: layer-wise decay and a head-only start (fine-tuning).

Keras' optimizers have one learning rate for every variable. Fine-tuning recipes need two things
more, both a per-variable factor on the rate (and on the decoupled weight decay, which Keras scales
by the rate too):

* layer-wise learning-rate decay (BEiT, Bao et al. 2022; MAE, He et al. 2022): block ``b`` of
  ``L`` learns at ``decay ** (L + 1 - b)``, the embeddings at ``decay ** (L + 1)``, the head at 1;
* a linear probe first (LP-FT, Kumar et al. 2022): for the first ``frozen_steps`` steps every
  variable outside the head has the factor 0, so a new head settles before it can distort the
  pre-trained features.

Both are functions of the step counter, which ``BackupAndRestore`` restores, so a resumed run
continues the same schedule. Gradients are still computed for the frozen variables (a head-only
epoch costs what a full one does; it is never slower than training from scratch).
"""

from __future__ import annotations

import re

import keras
from keras import ops

from vit_pipeline.layers import PACKAGE

# Where a variable sits, by its path: this project's layers and Keras-Hub's ViT.
_BLOCK = re.compile(r"(?:^|/)block(\d+)_|transformer_block_(\d+)/")
_EMBEDDING = re.compile(
    r"(?:^|/)(normalization|shifted_images|patches|patch_ln|patch_encoder|vit_patching_and_embedding)/"
)
_HEAD = re.compile(
    r"(?:^|/)(head_(?!ln/)|logits/)"
)  # head_ln is the encoder's last norm (depth L + 1, not probed)


def layer_depth(path: str, num_layers: int) -> int:
    """0 for the embeddings, ``b + 1`` for transformer block ``b`` (0-based), ``num_layers + 1`` for the
    head and the encoder's last norm."""
    if _HEAD.search(path):
        return num_layers + 1
    match = _BLOCK.search(path)
    if match:
        if match.group(1) is not None:
            return int(match.group(1)) + 1
        return int(match.group(2))  # Keras-Hub numbers its blocks from 1
    if _EMBEDDING.search(path):
        return 0
    return num_layers + 1  # e.g. Keras-Hub's final LayerNorm: with the head, as in BEiT


def is_head(path: str) -> bool:
    """The classification head: what a linear probe trains (``head_*`` and ``logits`` layers)."""
    return bool(_HEAD.search(path))


def rate_scales(variables, num_layers: int, layer_decay: float) -> dict[str, float]:
    """Variable path -> learning-rate factor for layer-wise decay."""
    return {
        v.path: float(layer_decay ** (num_layers + 1 - layer_depth(v.path, num_layers))) for v in variables
    }


@keras.saving.register_keras_serializable(package=PACKAGE)
class ScaledAdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` whose rate (and weight decay) is multiplied per variable.

    Args:
        rate_scales: Variable path -> factor (missing: 1).
        frozen_steps: Steps during which every variable that is not in the head has factor 0.
        **kwargs: ``keras.optimizers.AdamW`` arguments.
    """

    def __init__(self, rate_scales: dict[str, float] | None = None, frozen_steps: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate_scales = dict(rate_scales or {})
        self.frozen_steps = int(frozen_steps)
        self._scale_of: list[float] = []
        self._frozen_of: list[bool] = []

    def build(self, var_list):
        super().build(var_list)
        # The same order as the optimizer's own per-variable slots (_get_variable_index).
        self._scale_of = [float(self.rate_scales.get(v.path, 1.0)) for v in var_list]
        self._frozen_of = [self.frozen_steps > 0 and not is_head(v.path) for v in var_list]

    def _factor(self, variable, dtype):
        index = self._get_variable_index(variable)
        factor = ops.cast(self._scale_of[index], dtype)
        if self._frozen_of[index]:
            factor = ops.where(ops.less(self.iterations, self.frozen_steps), ops.cast(0.0, dtype), factor)
        return factor

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype) * self._factor(variable, variable.dtype)
        if self.weight_decay is not None and self._use_weight_decay(variable):
            # Keras decays by lr * wd * w before the update; here with this variable's rate. Done in
            # update_step, which runs per variable in the right (replica) context under tf.distribute.
            self.assign_sub(variable, variable * ops.cast(self.weight_decay, variable.dtype) * lr)
        super().update_step(gradient, variable, lr)

    def _apply_weight_decay(self, variables):
        """Applied in :meth:`update_step`, scaled per variable (the base applies one rate to all)."""

    def get_config(self):
        return {**super().get_config(), "rate_scales": self.rate_scales, "frozen_steps": self.frozen_steps}
