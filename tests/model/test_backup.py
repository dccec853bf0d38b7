"""The training backup a resume starts from: whole files only, and the epoch before when the last is not whole."""

from __future__ import annotations

import numpy as np
import pytest

from vit_pipeline.config import make_config
from vit_pipeline.data import Splits
from vit_pipeline.train import train

TINY = {"epochs": 3, "batch_size": 8, "projection_dim": 16, "transformer_units": (32, 16), "num_heads": 2,
        "transformer_layers": 1, "mlp_head_units": (16,), "patch_size": 8}  # fmt: skip


def _splits() -> Splits:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    return Splits(x, y, x[:6], y[:6], x[:6], y[:6], ["a", "b", "c"])


def _crash_after(epochs: int):
    import keras

    class Crash(keras.callbacks.Callback):  # after that epoch's backup (the backup callback runs first)
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == epochs:
                raise RuntimeError("crash")

    return Crash()


def test_a_backup_with_missing_layers_resumes_from_the_epoch_before(tmp_path):
    """What a SIGTERM during Keras' save left (a readable file with some layers): every resume failed on it."""
    import keras

    cfg = make_config("quickstart", TINY)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, _splits(), tmp_path / "run", callbacks=[_crash_after(2)])
    backup = tmp_path / "run" / "backup"
    assert (backup / "latest.weights.h5.bkp").is_file()  # epoch 1, whole
    partial = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])  # a whole file, the wrong layers
    partial.save_weights(str(backup / "latest.weights.h5"))
    result = train(cfg, _splits(), tmp_path / "run")
    assert result.resumed_from_epoch == 1 and result.epochs_run == 3


def test_a_save_cut_short_leaves_the_last_whole_backup(tmp_path, monkeypatch):
    """The new epoch's file is written beside the backup and renamed over it once whole."""
    import keras

    cfg = make_config("quickstart", TINY)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, _splits(), tmp_path / "run", callbacks=[_crash_after(1)])
    latest = tmp_path / "run" / "backup" / "latest.weights.h5"
    whole = latest.read_bytes()
    real = keras.Model.save_weights

    def cut_short(self, filepath, *args, **kwargs):
        if "best" in str(filepath):
            return real(self, filepath, *args, **kwargs)
        with open(filepath, "wb") as f:  # the signal arrives mid-write
            f.write(whole[: len(whole) // 3])
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(keras.Model, "save_weights", cut_short)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, _splits(), tmp_path / "run")
    assert latest.read_bytes() == whole
    assert not [p.name for p in latest.parent.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    assert train(cfg, _splits(), tmp_path / "run").resumed_from_epoch == 1
