import json

import keras
import numpy as np
import onnx
import pytest

from vit_pipeline.evaluate import predict_logits
from vit_pipeline.export import (
    ExportError,
    build_metadata,
    check_parity,
    export_onnx,
    ort_session,
    parity_gate,
)


def test_export_contract_names_dynamic_batch_and_metadata(tiny_export, real_cut):
    _, path, info = tiny_export
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"])[:2] == ["apple", "aquarium_fish"]
    assert meta["mlflow_run_id"] == "r123" and meta["dataset"] == "cifar100"
    assert meta["test_accuracy"] == "0.500000" and "raw RGB pixel values 0-255" in meta["input_contract"]
    assert "vit_pipeline_version" in meta
    # Inference graph only: no dropout or random ops.
    assert not {n.op_type for n in proto.graph.node} & {"Dropout", "RandomUniform", "RandomUniformLike"}
    session = ort_session(path)
    x = real_cut[2][:7].astype(np.float32)
    assert session.run(None, {"images": x})[0].shape == (7, 100)
    assert session.run(None, {"images": x[:1]})[0].shape == (1, 100)
    assert not list(path.parent.glob(".*tmp*"))


def test_parity_on_real_images(tiny_export, real_cut):
    model, path, _ = tiny_export
    images = real_cut[2][:256]
    report = check_parity(predict_logits(model, images), path, images, (1, 64), tolerance=1e-3)
    assert report.passed and report.num_images == 256
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
    assert set(report.per_batch) == {"1", "64"} and report.provider == "CPUExecutionProvider"
    parity_gate(report)


def test_gate_fails_on_perturbed_weights(tiny_export, real_cut):
    model, path, _ = tiny_export
    images = real_cut[2][:64]
    clone = keras.models.clone_model(model)
    clone.set_weights([w + np.random.default_rng(0).normal(0, 0.05, w.shape) for w in model.get_weights()])
    report = check_parity(predict_logits(clone, images), path, images, (64,), tolerance=1e-3)
    assert not report.passed
    with pytest.raises(ExportError, match="parity gate failed"):
        parity_gate(report)


def test_export_refuses_unconvertible_ops_and_writes_nothing(tmp_path):
    # Keras' exact GELU lowers to Erfc: tf2onnx "succeeds" with an invalid graph.
    inputs = keras.Input((32, 32, 3), name="images")
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(4, activation=keras.activations.gelu)(x)
    model = keras.Model(inputs, x)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="Erfc"):
        export_onnx(model, target, build_metadata(["a", "b", "c", "d"], (32, 32, 3)))
    assert list(tmp_path.iterdir()) == []


def test_not_an_onnx_file(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_text("hello")
    with pytest.raises(ExportError, match="cannot load"):
        ort_session(fake)
