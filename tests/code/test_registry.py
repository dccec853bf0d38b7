"""Champion/challenger against a real MLflow SQLite store."""

import numpy as np
import pytest

from vit_pipeline import tracking
from vit_pipeline.config import make_config
from vit_pipeline.registry import CHAMPION, register_onnx


def _register(cfg, path, accuracy):
    run_id = tracking.create_run(cfg, "test")
    example = np.zeros((1, 32, 32, 3), np.float32)
    return register_onnx(cfg, run_id, str(path), example, accuracy, "digest")


@pytest.fixture
def cfg(tmp_path):
    return make_config("cifar100", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def test_better_model_is_promoted_worse_is_not(cfg, tiny_export):
    _, path, _ = tiny_export
    client = tracking.client(cfg)
    first = _register(cfg, path, 0.50)
    assert first.promoted and first.reason == "no champion yet" and first.name == "vit-cifar100"
    better = _register(cfg, path, 0.70)
    assert better.promoted and better.version == "2"
    worse = _register(cfg, path, 0.60)
    assert not worse.promoted and "< champion v2's 0.7000" in worse.reason
    equal = _register(cfg, path, 0.70)
    assert equal.promoted  # at least the champion's accuracy
    assert str(client.get_model_version_by_alias("vit-cifar100", CHAMPION).version) == "4"
    v3 = client.get_model_version("vit-cifar100", "3")
    assert v3.tags["test_accuracy"] == "0.600000" and v3.tags["promotion"].startswith("not promoted")
    run = client.get_run(v3.run_id)
    assert run.data.tags["registry.decision"] == "not promoted"


def test_other_dataset_and_policies(cfg, tiny_export):
    _, path, _ = tiny_export
    client = tracking.client(cfg)
    _register(cfg, path, 0.5)
    coarse = cfg.__class__(
        **{**cfg.to_dict(), "label_mode": "coarse", "registered_model_name": "vit-cifar100"}
    )
    other = _register(coarse, path, 0.9)
    assert not other.promoted and "trained on 'cifar100'" in other.reason
    never = cfg.__class__(**{**cfg.to_dict(), "promotion_policy": "never"})
    assert not _register(never, path, 0.99).promoted
    always = cfg.__class__(**{**cfg.to_dict(), "promotion_policy": "always"})
    assert _register(always, path, 0.01).promoted
    assert str(client.get_model_version_by_alias("vit-cifar100", CHAMPION).version) == "4"
    # The registered artifact is the ONNX model, loadable by MLflow's onnx flavour.
    import mlflow.onnx

    loaded = mlflow.onnx.load_model("models:/vit-cifar100@champion")
    assert [i.name for i in loaded.graph.input] == ["images"]
