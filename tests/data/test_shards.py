"""Image folders decoded into shards: indexed like arrays, streamed for training, same digest."""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_pipeline import data
from vit_pipeline.config import make_config
from vit_pipeline.shards import ShardedImages, dataset, update_bytes, update_digest, write_shards


@pytest.fixture
def folder(tmp_path):
    """18 files in 3 classes (one unreadable), of different sizes and modes."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for c, (mode, size) in enumerate((("RGB", (50, 40)), ("L", (20, 20)), ("RGBA", (64, 48)))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6 if c else 5):
            arr = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8).squeeze()
            Image.fromarray(arr, mode=mode).save(
                root / f"class{c}" / f"{i}.{'jpg' if mode == 'RGB' else 'png'}"
            )
    (root / "class1" / "broken.png").write_bytes(b"not an image")
    return root


def test_shards_hold_the_same_images_as_the_in_memory_reader(folder, tmp_path):
    x, y, names, skipped = data.read_class_folders(folder, 16)
    files, labels, _ = data.list_class_files(folder)
    sharded, kept, bad = write_shards([Path(f) for f in files], labels, tmp_path / "s",
                                      "train", 16, shard_images=4)  # fmt: skip
    assert (bad, skipped) == (1, 1) and len(sharded.paths) == 5 and sharded.shape == x.shape
    np.testing.assert_array_equal(kept, y)
    np.testing.assert_array_equal(np.asarray(sharded), x)
    for index in (slice(None), slice(3, 9), slice(0, 1), slice(15, 40), slice(2, 14, 3), slice(9, 3)):
        np.testing.assert_array_equal(sharded[index], x[index])
    rows = np.array([15, 0, 7, 7, -1, 4])
    np.testing.assert_array_equal(sharded[rows], x[rows])
    np.testing.assert_array_equal(sharded[5], x[5])
    np.testing.assert_array_equal(sharded[-2], x[-2])
    with pytest.raises(IndexError):
        sharded[len(x)]
    a, b = hashlib.sha256(), hashlib.sha256()
    update_digest(a, sharded)
    update_digest(b, x)
    assert a.hexdigest() == b.hexdigest()
    update_bytes(a, sharded)
    update_bytes(b, x)
    assert a.hexdigest() == b.hexdigest()


def test_prepared_folder_is_sharded_saved_and_reloaded(folder, tmp_path):
    cfg = make_config("quickstart", {"dataset": "image_folder", "data_path": str(folder), "test_split": 0.25})
    work = tmp_path / "work"
    splits = data.prepare(cfg, shard_dir=work / "shards")
    assert all(isinstance(x, ShardedImages) for x in (splits.x_train, splits.x_val, splits.x_test))
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 17  # the broken file skipped
    assert splits.info["skipped_files"] == 1 and splits.input_shape == (32, 32, 3)
    assert set(splits.y_train) == {0, 1, 2}  # stratified: every class in training
    digest = splits.digest()
    again = data.Splits.load(splits.save(work / "data.npz"))
    assert isinstance(again.x_train, ShardedImages) and again.digest() == digest
    np.testing.assert_array_equal(np.asarray(again.x_test), np.asarray(splits.x_test))
    # Shard paths are stored relative to the run's directory: the work folder can move.
    moved = tmp_path / "moved"
    work.rename(moved)
    assert data.Splits.load(moved / "data.npz").digest() == digest
    # The same folder, the same seed: the same split and bytes.
    assert data.prepare(cfg, shard_dir=tmp_path / "again").digest() == digest


def test_the_training_stream_yields_every_image_once_per_epoch_in_a_new_order(folder, tmp_path):
    files, labels, _ = data.list_class_files(folder)
    sharded, kept, _ = write_shards([Path(f) for f in files], labels, tmp_path / "s",
                                    "train", 8, shard_images=3)  # fmt: skip
    ds = dataset(sharded, kept, seed=0, shuffle=True)
    assert int(ds.cardinality()) == len(kept)  # Keras counts its steps
    epochs = [[(int(img.numpy().astype(np.int64).sum()), int(lab)) for img, lab in ds] for _ in range(2)]
    expected = sorted((int(sharded[i].astype(np.int64).sum()), int(kept[i])) for i in range(len(kept)))
    assert sorted(epochs[0]) == sorted(epochs[1]) == expected
    assert epochs[0] != epochs[1]
    plain = [int(lab) for _, lab in dataset(sharded, kept, seed=0, shuffle=False)]
    assert plain == kept.tolist()  # validation and test: in order


def test_a_sharded_folder_trains_and_evaluates_like_an_array(folder, tmp_path, tiny_overrides):
    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.model import load_model
    from vit_pipeline.train import train

    cfg = make_config("quickstart", {**tiny_overrides, "dataset": "image_folder", "data_path": str(folder),
                                     "epochs": 2, "batch_size": 4, "test_split": 0.25})  # fmt: skip
    splits = data.prepare(cfg, shard_dir=tmp_path / "shards")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. Keras' "Your input ran out of data"
        result = train(cfg, splits, tmp_path / "train")  # streamed from the shards
    assert result.epochs_run == 2 and 0 <= result.best_val_accuracy <= 1
    model = load_model(result.model_path)
    # The model's Normalization was adapted on the training shards: the mean of the training images.
    mean = np.asarray(splits.x_train, np.float64).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.ravel(model.get_layer("normalization").mean), mean, rtol=1e-4)
    np.testing.assert_allclose(
        predict_logits(model, splits.x_test), predict_logits(model, np.asarray(splits.x_test))
    )
