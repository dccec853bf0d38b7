"""The ONNX rewrites fire on the ViT export and keep its outputs."""

import collections

import keras
import onnx
import pytest

from tests.conftest import TINY
from vit_pipeline.benchmark import count_gflop_per_image, fresh_keras_model
from vit_pipeline.config import make_config
from vit_pipeline.evaluate import predict_logits
from vit_pipeline.export import build_metadata, check_parity, export_onnx
from vit_pipeline.optimize import optimize


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """A tiny ViT with non-zero biases (zeros would be folded away by the exporter)."""
    cfg = make_config("cifar100", {**TINY, "transformer_layers": 2})
    model = fresh_keras_model(cfg, num_classes=10)
    path = tmp_path_factory.mktemp("opt") / "tiny.onnx"
    export_onnx(model, path, build_metadata([str(i) for i in range(10)], (32, 32, 3)))
    return cfg, model, path


def test_every_pattern_is_fused_and_parity_holds(perturbed, real_cut, tmp_path):
    cfg, model, path = perturbed
    optimized, report = optimize(onnx.load(path))
    counts = report.to_dict()
    layers = cfg.transformer_layers
    assert counts["LayerNormalization"] == 2 * layers + 1
    assert counts["Gelu"] == len(cfg.transformer_units) * layers + len(cfg.mlp_head_units)
    assert counts["Attention"] == layers
    assert counts["TensordotToMatMul"] > 0
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    assert ops["GlobalAveragePool"] == 0 and ops["Erf"] == 0 and ops["Softmax"] == 0
    assert ops["Attention"] == layers
    # Metadata survives the rewrite.
    assert {p.key for p in optimized.metadata_props} >= {"class_names", "input_contract"}
    onnx.save(optimized, tmp_path / "opt.onnx")
    images = real_cut[2][:128]
    parity = check_parity(predict_logits(model, images), tmp_path / "opt.onnx", images, (1, 64), 1e-4)
    assert parity.passed, parity.to_dict()


def test_other_graphs_are_left_alone(tmp_path):
    inputs = keras.Input((32, 32, 3), name="images")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    path = tmp_path / "cnn.onnx"
    export_onnx(model, path, build_metadata(["a", "b", "c"], (32, 32, 3)))
    original = onnx.load(path)
    optimized, report = optimize(original)
    assert sum(v for k, v in report.to_dict().items() if k != "DeadNodesRemoved") == 0
    assert [n.op_type for n in optimized.graph.node] == [n.op_type for n in original.graph.node]


def test_flop_count_matches_the_architecture(perturbed):
    cfg, _, path = perturbed
    n, p, d = cfg.num_patches, cfg.patch_size, cfg.projection_dim
    hidden = cfg.num_heads * d  # key_dim = projection_dim per head, as in the seed
    macs = n * (p * p * 3) * (p * p * 3)  # patch extraction exports as an identity-kernel Conv
    macs += n * (p * p * 3) * d  # projection
    per_block = 3 * n * d * hidden + 2 * cfg.num_heads * n * n * d + n * hidden * d
    units = (d, *cfg.transformer_units)
    per_block += sum(n * a * b for a, b in zip(units[:-1], units[1:], strict=True))
    macs += cfg.transformer_layers * per_block
    head = (n * d, *cfg.mlp_head_units, 10)
    macs += sum(a * b for a, b in zip(head[:-1], head[1:], strict=True))
    assert count_gflop_per_image(path) == pytest.approx(2 * macs / 1e9, rel=1e-9)


@pytest.mark.integration
def test_seed_architecture_flops(tmp_path):
    """0.40 GFLOP per image for the seed (FACTS.md): the benchmark's count on the exported seed model,
    against the seed's architecture written out by hand (72x72 images, patches of 6, 8 blocks of 4 heads
    of 64, MLP 128-64, head 2048-1024, 100 classes)."""
    cfg = make_config("cifar100")
    path = tmp_path / "seed.onnx"
    export_onnx(
        fresh_keras_model(cfg, num_classes=100),
        path,
        build_metadata([str(i) for i in range(100)], (72, 72, 3)),
    )
    n, patch, d, heads = (72 // 6) ** 2, 6 * 6 * 3, 64, 4
    macs = n * patch * patch + n * patch * d  # patch extraction (an identity-kernel Conv), projection
    block = 3 * n * d * (heads * d) + 2 * heads * n * n * d + n * (heads * d) * d  # Q, K, V; scores, mix; out
    block += n * d * 128 + n * 128 * 64  # the block's MLP
    macs += 8 * block + n * d * 2048 + 2048 * 1024 + 1024 * 100
    gflop = count_gflop_per_image(path)
    assert gflop == pytest.approx(2 * macs / 1e9, rel=1e-9)
    assert gflop == pytest.approx(0.40, abs=0.02)
