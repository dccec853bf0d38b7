"""AdamW semantics against the seed's tensorflow-addons formula, and what decays."""

import keras
import numpy as np
import pytest

from tests.conftest import TINY
from vit_pipeline import tracking
from vit_pipeline.config import make_config
from vit_pipeline.model import build_vit
from vit_pipeline.train import compile_model, no_decay_variables


def test_one_keras_adamw_step_equals_tfa_with_wd_over_lr():
    """tfa: w -= lr*m_hat/(sqrt(v_hat)+eps) + wd*w. Keras with weight_decay = wd/lr must match.

    Keras (like tf.keras, which tfa extended) adds epsilon to sqrt(v), not
    sqrt(v_hat); a tiny epsilon makes both forms the same number.
    """
    lr, wd, eps, b1, b2 = 1e-3, 1e-4, 1e-12, 0.9, 0.999
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(7, 5)).astype(np.float32)
    g = rng.normal(size=(7, 5)).astype(np.float32)
    var = keras.Variable(w0)
    opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=wd / lr, beta_1=b1, beta_2=b2, epsilon=eps)
    opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g**2 / (1 - b2)
    tfa = w0 - lr * m_hat / (np.sqrt(v_hat) + eps) - wd * w0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(var), tfa, rtol=0, atol=1e-6)


def test_the_optimizer_the_training_code_builds_decays_like_the_seed():
    """The seed's tfa AdamW (lr 1e-3, wd 1e-4, betas 0.9/0.999, eps 1e-7), one step by hand, against the
    optimizer ``compile_model`` builds from the seed config (which must turn wd 1e-4 into Keras' 0.1).

    Every weight decays in the seed (LayerNorm scales are 1, so a decay 1000x too weak is 1e-4 off).
    """
    lr, wd, b1, b2, eps = 1e-3, 1e-4, 0.9, 0.999, 1e-7  # the seed's tensorflow-addons AdamW
    cfg = make_config("cifar100", TINY)
    model = build_vit(cfg, num_classes=5, input_shape=(32, 32, 3))
    compile_model(model, cfg, 5)
    rng = np.random.default_rng(0)
    variables = model.trainable_variables
    before = [keras.ops.convert_to_numpy(v).astype(np.float64) for v in variables]
    # Gradients away from 0, so where Keras and tfa put epsilon changes nothing measurable.
    grads = [rng.choice([-1.0, 1.0], w.shape) * rng.uniform(0.5, 1.5, w.shape) for w in before]
    model.optimizer.apply_gradients(
        [
            (keras.ops.convert_to_tensor(g.astype(np.float32)), v)
            for g, v in zip(grads, variables, strict=True)
        ]
    )
    worst = 0.0
    for v, w0, g in zip(variables, before, grads, strict=True):
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g**2 / (1 - b2)
        expected = w0 - lr * m_hat / (np.sqrt(v_hat) + eps) - wd * w0
        worst = max(worst, float(np.abs(keras.ops.convert_to_numpy(v) - expected).max()))
    assert worst < 1e-6, f"one step of the project's AdamW is {worst:.2g} away from the seed's tfa AdamW"


def test_tfa_equivalent_param_says_what_is_true_for_the_schedule():
    assert tracking.weight_decay_tfa_equivalent(make_config("cifar100")) == "0.0001"
    improved = tracking.weight_decay_tfa_equivalent(make_config("cifar100-improved"))
    assert improved == "0.05 x lr(t) (warmup_cosine; peak 5e-05, 0 at the end)"


@pytest.mark.parametrize("scope", ["all", "kernels"])
def test_improved_preset_keeps_norms_biases_and_embeddings_out_of_decay(scope):
    small = {k: v for k, v in TINY.items() if k not in ("mlp_head_units",)}
    cfg = make_config("cifar100-improved", {**small, "head_dim": 8, "weight_decay_scope": scope})
    model = build_vit(cfg, num_classes=5, input_shape=(32, 32, 3))
    compile_model(model, cfg, 5)
    excluded = {v.path for v in no_decay_variables(model)}
    assert any("position_embedding" in p for p in excluded) and any("class_token" in p for p in excluded)
    assert any("log_temperature" in p for p in excluded) and any(p.endswith("bias") for p in excluded)
    assert any(p.endswith("gamma") for p in excluded) and not any(p.endswith("kernel") for p in excluded)
    # One real step with zero gradients: only decayed weights move.
    opt = model.optimizer
    before = {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables}
    opt.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
    moved = {
        v.path
        for v in model.trainable_variables
        if not np.allclose(keras.ops.convert_to_numpy(v), before[v.path])
    }
    kernels = {v.path for v in model.trainable_variables if v.path.endswith("kernel")}
    if scope == "kernels":
        assert moved and moved <= kernels and not (moved & excluded)
    else:
        assert moved & {p for p in excluded if p.endswith("gamma")}  # the seed decays everything
    assert make_config("cifar100-improved").weight_decay_scope == "kernels"
    assert make_config("cifar100").weight_decay_scope == "all"
