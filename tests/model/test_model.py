import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import CIFAR_CUT
from vit_pipeline import data
from vit_pipeline.config import make_config
from vit_pipeline.layers import PatchEncoder, Patches, gelu_erf
from vit_pipeline.model import build_vit, load_model
from vit_pipeline.train import train


def test_cifar100_preset_has_the_keras_io_parameter_count():
    model = build_vit(make_config("cifar100"), num_classes=100)
    assert model.count_params() == 21_759_019
    flatten_head = model.get_layer("head_mlp_dense0").count_params()
    assert flatten_head == 144 * 64 * 2048 + 2048  # the 18.9 M-parameter Flatten head


def test_gelu_erf_matches_exact_gelu():
    x = np.linspace(-6, 6, 1001).astype(np.float32)
    ours = keras.ops.convert_to_numpy(gelu_erf(x))
    ref = keras.ops.convert_to_numpy(keras.activations.gelu(x, approximate=False))
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (Patches(4, name="p"), (2, 8, 8, 3)),
        (PatchEncoder(num_patches=4, projection_dim=6, name="e"), (2, 4, 48)),
    ],
)
def test_layer_config_round_trip(layer, shape):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), y)


def test_patches_shape_and_content():
    img = np.arange(2 * 8 * 8 * 3, dtype="float32").reshape(2, 8, 8, 3)
    out = keras.ops.convert_to_numpy(Patches(4)(img))
    assert out.shape == (2, 4, 48)
    np.testing.assert_array_equal(out[1, 1].reshape(4, 4, 3), img[1, 0:4, 4:8])


def test_patch_size_must_divide_image():
    with pytest.raises(ValueError, match="Expected patch_size to divide the image height"):
        Patches(7)(np.zeros((1, 72, 72, 3), "float32"))


def test_saved_model_reloads_to_identical_predictions(tmp_path, tiny_overrides):
    cfg = make_config("cifar100", tiny_overrides)
    x = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3)).astype("float32")
    model = build_vit(cfg, num_classes=7, train_images=x)
    model.save(tmp_path / "m.keras")
    again = load_model(str(tmp_path / "m.keras"))
    np.testing.assert_array_equal(model(x, training=False), again(x, training=False))
    assert again.get_layer("patch_encoder").get_config() == model.get_layer("patch_encoder").get_config()


def test_inference_is_deterministic_and_training_is_not(tiny_overrides):
    cfg = make_config("cifar100", tiny_overrides)
    x = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3)).astype("float32")
    model = build_vit(cfg, num_classes=5, train_images=x)
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=True))


def test_two_epochs_on_real_images_reduce_the_loss(tmp_path, tiny_overrides, capsys, monkeypatch):
    monkeypatch.delenv("VIT_PIPELINE_PROGRESS", raising=False)
    cfg = make_config("cifar100", {**tiny_overrides, "data_path": str(CIFAR_CUT), "label_mode": "coarse"})
    splits = data.prepare(cfg)
    result = train(cfg, splits, tmp_path)
    history = json.loads(Path(result.history_path).read_text())
    assert len(history["loss"]) == 2
    assert history["loss"][1] < history["loss"][0]
    # Not a terminal: exactly one line per epoch, nothing redrawn.
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("Epoch ")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"], out.out
    assert "val_accuracy" in lines[0] and "\r" not in out.out + out.err
    assert (tmp_path / "model.keras").is_file() and (tmp_path / "best.weights.h5").is_file()
    # The best-validation weights are the ones restored and saved.
    model = load_model(result.model_path)
    model.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    acc = model.evaluate(splits.x_val.astype("float32"), splits.y_val, verbose=0, return_dict=True)[
        "accuracy"
    ]
    assert acc == pytest.approx(result.best_val_accuracy, abs=1e-6)


def test_a_second_trainer_of_the_same_run_is_refused(tmp_path, tiny_overrides):
    import fcntl
    import subprocess
    import sys

    from vit_pipeline.errors import TrainingInProgress

    cfg = make_config("cifar100", {**tiny_overrides, "data_path": str(CIFAR_CUT), "label_mode": "coarse",
                                   "epochs": 1})  # fmt: skip
    splits = data.prepare(cfg)
    # Another process holds the run's lock, as a live orphaned trainer would.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX);"
        "f.write('pid 4242 on elsewhere'); f.flush(); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / ".train.lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingInProgress, match="being trained right now by pid 4242 on elsewhere"):
            train(cfg, splits, tmp_path)
        assert not (tmp_path / "epochs.jsonl").exists() and not (tmp_path / "model.keras").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died: the kernel released the lock, training goes ahead.
    assert train(cfg, splits, tmp_path).epochs_run == 1
    with open(tmp_path / ".train.lock") as f:  # and released it again at the end
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
