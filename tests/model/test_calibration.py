"""The calibration gate: ECE, temperature scaling, and the temperature the consumer applies."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from vit_pipeline import calibration, data
from vit_pipeline.config import make_config
from vit_pipeline.evaluate import predict_logits
from vit_pipeline.train import train


def test_ece_of_a_hand_computed_case():
    # Two bins: confidences 0.9 (2 right of 2) and 0.6 (1 right of 2) -> |1-0.9|/2 + |0.5-0.6|/2 = 0.1.
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 0, 0, 1])
    table = calibration.reliability(np.log(p), labels, bins=10)
    assert table["ece"] == pytest.approx(0.1)
    assert sum(table["support"]) == 4 and table["support"][8] == 2 and table["support"][5] == 2


def test_fitted_temperature_recovers_the_one_that_made_the_logits_overconfident():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (20000, 10))
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=row) for row in probs])  # drawn from a calibrated model
    t = calibration.fit_temperature(true_logits * 3.0, labels)  # the same model, 3x overconfident
    assert t == pytest.approx(3.0, rel=0.05)
    assert calibration.nll(true_logits * 3, labels, t) < calibration.nll(true_logits * 3, labels)


def test_a_temperature_that_does_not_generalise_within_validation_is_not_served():
    """Few errors: a sharper softmax always lowers the NLL of the images it was fitted on, and the one error
    decides. The quickstart's case: 144 validation images, one wrong (T = 0.43 made the test ECE worse)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 144)
    logits = rng.normal(0, 1, (144, 10))
    logits[np.arange(144), labels] += 6.0  # right and confident
    logits[0, labels[0]] -= 12.0  # but one
    assert calibration.fit_temperature(logits, labels) < 0.8  # the plain fit sharpens
    t, why = calibration.checked_temperature(logits, labels)
    assert t == 1.0 and why.startswith("kept T = 1: the fitted") and "did not generalise" in why
    # A truly over-confident model: the check keeps the fit.
    true_logits = rng.normal(0, 2, (4000, 10))
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    drawn = np.array([rng.choice(10, p=row) for row in probs])
    t, why = calibration.checked_temperature(true_logits * 3.0, drawn)
    assert t == pytest.approx(3.0, rel=0.1) and why.startswith("fitted on the validation split")


def test_temperature_fit_on_real_images_lowers_the_test_ece(tmp_path, tiny_overrides):
    # Real handwritten digits; strong label smoothing makes a ViT under-confident (its top-1 stays).
    cfg = make_config("quickstart", {**tiny_overrides, "patch_size": 4, "epochs": 6, "label_smoothing": 0.4,
                                     "learning_rate": 0.003})  # fmt: skip
    splits = data.prepare(cfg)
    from vit_pipeline.model import load_model

    model = load_model(train(cfg, splits, tmp_path).model_path)
    val, test = predict_logits(model, splits.x_val), predict_logits(model, splits.x_test)
    result, before, after = calibration.calibrate(val, splits.y_val, test, splits.y_test)
    assert np.mean(test.argmax(1) == splits.y_test) > 0.5  # a model that learned something
    assert result.temperature < 1.0  # under-confident: sharpened
    assert result.ece_after < result.ece_before and result.nll_after < result.nll_before
    assert before["ece"] == result.ece_before and after["ece"] == result.ece_after
    path = calibration.plot_reliability(before, after, result.temperature, tmp_path / "r.png")
    assert path.stat().st_size > 10_000


def test_the_consumer_applies_the_files_temperature_and_refuses_a_bad_one(tmp_path):
    from vit_consumer.classifier import InputError, OnnxClassifier
    from vit_consumer.contract import softmax

    from tests.conftest import constant_classifier, real_images

    path = constant_classifier(tmp_path / "c.onnx", 4, 2)
    images = real_images(3).astype(np.float32)
    plain = OnnxClassifier(path)
    logits = plain.logits(images)

    def with_temperature(value: str):
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props} | {"temperature": value}
        onnx.helper.set_model_props(model, meta)
        out = tmp_path / f"t-{len(value)}-{abs(hash(value))}.onnx"
        onnx.save(model, str(out))
        return out

    hot = OnnxClassifier(with_temperature("0.25"))
    assert plain.temperature == 1.0 and hot.temperature == 0.25
    got = hot.predict(images, top_k=4)[0]
    expected = softmax(logits, 0.25)[0]
    assert [a["index"] for a in got] == [
        a["index"] for a in plain.predict(images, top_k=4)[0]
    ]  # ranking kept
    assert got[0]["probability"] == pytest.approx(float(expected.max()), rel=1e-6)
    assert got[0]["probability"] > plain.predict(images, top_k=1)[0][0]["probability"]
    assert hot.describe()["temperature"] == 0.25
    for bad in ("0", "-1", "nan", "warm"):
        with pytest.raises(InputError, match="Expected a finite temperature > 0"):
            OnnxClassifier(with_temperature(bad))
    assert json.loads(json.dumps(hot.describe()))  # the /health answer stays JSON
