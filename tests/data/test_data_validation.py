"""The data-validation gate on real CIFAR-100 images written as image folders.

Each case is a real folder (PNG/JPEG files) prepared by the pipeline's own data stage
and checked by the gate against the schema the first run of the dataset left behind.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_pipeline import data, data_validation, runs, tracking
from vit_pipeline.config import make_config
from vit_pipeline.context import StageContext
from vit_pipeline.data import Splits

CLASSES = 5


@pytest.fixture(scope="module")
def originals(real_cut):
    """Six real images of each of the first CLASSES classes (the cut's train and test pooled)."""
    x_train, y_train, x_test, y_test, names = real_cut
    x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    return {names[c]: x[y == c] for c in range(CLASSES)}


@pytest.fixture(scope="module")
def by_class(originals):
    """Twelve images a class: the originals and their mirror images (enough for every split)."""
    return {name: np.concatenate([imgs, imgs[:, :, ::-1]]) for name, imgs in originals.items()}


def write_folder(root: Path, images: dict[str, np.ndarray], fmt: str = "PNG", shift=None) -> Path:
    for name, imgs in images.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            if shift is not None:
                img = np.clip(img.astype(np.int16) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.{fmt.lower()}", fmt)
    return root


def folder_cfg(root: Path, **extra):
    # One dataset name for every variant of the folder: they are runs of the same dataset.
    return make_config("quickstart", {"dataset": "image_folder", "data_path": str(root), "dataset_name": "pets",
                                      "test_split": 0.34, **extra})  # fmt: skip


def validate(cfg) -> tuple[str, data_validation.DataValidation | Exception]:
    with runs.tracked_run(cfg) as run_id:
        ctx = StageContext.open(cfg, run_id)
        prepared = data.run(ctx, cfg.data_path)
        try:
            return run_id, data_validation.run(ctx, prepared.data_path)
        except data_validation.DataValidationError as exc:
            return run_id, exc


def test_statistics_count_classes_channels_and_constant_images(real_cut):
    x, y, _, _, names = real_cut
    x = x.copy()
    x[7] = 0  # an all-black frame
    stats = data_validation.split_statistics(x, y, names)
    assert stats.count == len(y) and sum(stats.class_counts.values()) == len(y)
    assert stats.class_counts[names[0]] == int(np.sum(y == 0))
    np.testing.assert_allclose(stats.channel_mean, x.reshape(-1, 3).mean(0), atol=1e-3)
    np.testing.assert_allclose(stats.channel_std, x.reshape(-1, 3).std(0), atol=1e-3)
    assert all(abs(sum(h) - 1) < 1e-4 for h in stats.channel_histograms)
    assert stats.constant_images == 1 and stats.constant_examples == [7]


def test_first_run_writes_the_schema_later_runs_are_held_to_it(tmp_path, by_class, pipeline_home):
    base = write_folder(tmp_path / "v1", by_class)
    run_id, first = validate(folder_cfg(base))
    assert isinstance(first, data_validation.DataValidation) and first.schema_created
    schema = json.loads(Path(first.schema_path).read_text())
    assert Path(first.schema_path) == pipeline_home / "schemas" / "pets.json"
    assert schema["class_names"] == sorted(by_class) and schema["source_modes"] == ["RGB"]
    tags = tracking.client(folder_cfg(base)).get_run(run_id).data.tags
    assert tags["gate.data_validation"].startswith("passed") and tags["gate.drift"].startswith("not computed")

    # A class removed: the class list changed.
    removed = dict(by_class)
    gone = sorted(by_class)[2]
    del removed[gone]
    run_id, failed = validate(folder_cfg(write_folder(tmp_path / "removed", removed)))
    assert isinstance(failed, data_validation.DataValidationError)
    assert f"class list changed (missing [{gone!r}]" in str(failed) and "\n" not in str(failed)
    assert "if this is another dataset, give it its own --dataset-name" in str(failed)
    assert (
        tracking.client(folder_cfg(base))
        .get_run(run_id)
        .data.tags["gate.data_validation"]
        .startswith("failed")
    )

    # A class that lost most of its images: under its minimum.
    thinned = {**by_class, gone: by_class[gone][:3]}
    _, failed = validate(folder_cfg(write_folder(tmp_path / "thinned", thinned)))
    assert isinstance(failed, data_validation.DataValidationError)
    assert "classes under their minimum in train" in str(failed) and f"{gone!r} has" in str(failed)

    # Grayscale files: a mode the schema has not seen.
    gray = tmp_path / "gray"
    write_folder(gray, by_class)
    for f in (gray / gone).iterdir():
        Image.open(f).convert("L").save(f)
    _, failed = validate(folder_cfg(gray))
    assert "new image modes ['L']" in str(failed)

    # The same folder again passes; an edited schema is what is checked.
    _, again = validate(folder_cfg(base))
    assert isinstance(again, data_validation.DataValidation) and not again.schema_created
    schema["min_class_images"]["train"][gone] = 99
    Path(first.schema_path).write_text(json.dumps(schema))
    _, failed = validate(folder_cfg(base))
    assert f"{gone!r} has" in str(failed) and "(minimum 99)" in str(failed)


def test_an_emptied_class_folder_fails_in_one_line(tmp_path, by_class):
    root = write_folder(tmp_path / "emptied", by_class)
    gone = sorted(by_class)[1]
    for f in (root / gone).iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match=f"Class folder .*{gone} has no readable images"):
        validate(folder_cfg(root))


def test_renamed_reencoded_copies_in_the_test_split_are_found_and_can_be_dropped(tmp_path, originals):
    by_class = originals
    root = tmp_path / "leaky"
    train = {name: imgs[:4] for name, imgs in by_class.items()}
    test = {name: imgs[4:] for name, imgs in by_class.items()}
    write_folder(root / "train", train)
    write_folder(root / "test", test)
    # Copies of training images in the test split: one byte-identical PNG, two re-encoded as JPEG.
    names = sorted(by_class)
    shutil.copy(root / "train" / names[0] / "000.png", root / "test" / names[0] / "copy-of-a-train-image.png")
    for k, name in enumerate(names[1:3]):
        buf = io.BytesIO()
        Image.fromarray(train[name][k]).save(buf, "JPEG", quality=90)
        (root / "test" / name / f"renamed-{k}.jpg").write_bytes(buf.getvalue())
    cfg = folder_cfg(root, leakage_max_distance=6)
    run_id, found = validate(cfg)
    assert found.leakage.exact == 1 and found.leakage.near == 2, found.leakage.pairs
    assert found.leakage.dropped == 0
    client = tracking.client(cfg)
    assert client.get_run(run_id).data.metrics["data.test_near_duplicates"] == 2
    listed = json.loads(Path(client.download_artifacts(run_id, "data/leakage.json")).read_text())
    assert {p["kind"] for p in listed["pairs"]} == {"exact", "near"}

    _, dropped = validate(folder_cfg(root, leakage_max_distance=6, drop_leaked_test=True))
    assert dropped.leakage.dropped == 3
    before = len(test[names[0]]) * len(names) + 3
    assert len(Splits.load(dropped.data_path).y_test) == before - 3


def test_colour_shift_against_the_champion_is_recorded_and_blocks_promotion(tmp_path, by_class):
    from tests.conftest import constant_classifier
    from vit_pipeline import registry

    base = write_folder(tmp_path / "base", by_class)
    cfg = folder_cfg(base, promotion_policy="always")
    run_id, first = validate(cfg)
    assert first.drift.computed is False
    # The thresholds it would be held to are recorded, not zeros (data/drift.json is read in the MLflow UI).
    assert (first.drift.channel_threshold, first.drift.class_threshold) == (
        cfg.drift_channel_threshold, cfg.drift_class_threshold)  # fmt: skip
    # That run's model becomes champion (a real ONNX file, registered by the pipeline).
    split = registry.TestSplit.from_splits(Splits.load(first.data_path))
    onnx = constant_classifier(tmp_path / "c.onnx", CLASSES, 0, split.class_names)
    assert registry.register_onnx(cfg, run_id, str(onnx), split).promoted

    # The same data: drift recorded, within the thresholds.
    _, same = validate(cfg)
    assert same.drift.computed and not same.drift.above and max(same.drift.channel_js) < 0.05
    # A new camera: every image 60 levels redder.
    shifted = write_folder(tmp_path / "shifted", by_class, shift=np.array([60, 0, 0], np.int16))
    run_id, moved = validate(folder_cfg(shifted, promotion_policy="always"))
    assert moved.drift.above and moved.drift.channel_js[0] > 0.1 >= moved.drift.channel_js[2]
    assert moved.drift.outcome.endswith("(thresholds 0.1 / 0.05; over: channel JS)")  # which measure tripped
    client = tracking.client(cfg)
    run = client.get_run(run_id)
    assert run.data.tags["gate.drift"].startswith("above") and run.data.metrics["drift.channel_js_max"] > 0.1
    registered = registry.register_onnx(cfg, run_id, str(onnx), split)
    assert not registered.promoted and registered.reason.startswith("blocked by data drift above")
    version = client.get_model_version(registered.name, registered.version)
    assert version.tags["gate.drift"].startswith("above")
    # drift_blocks_promotion=False: recorded, not blocking.
    lenient = folder_cfg(shifted, promotion_policy="always", drift_blocks_promotion=False)
    run_id, recorded = validate(lenient)
    assert recorded.drift.above
    assert registry.register_onnx(lenient, run_id, str(onnx), split).promoted


def test_images_under_two_classes_fail_validation_from_the_first_run(tmp_path, by_class):
    """A folder copied under a second name: identical pixels under two labels (the leakage gate read them as
    copies that flatter the model; they contradict it). They fail validation even when the schema is new, and
    a failed first run states no schema (the folder fixed, the same dataset name passes)."""
    names = sorted(by_class)
    n = len(by_class[names[0]])
    copied = {**by_class, f"{names[0]}_copy": by_class[names[0]]}
    cfg = folder_cfg(write_folder(tmp_path / "copied", copied), dataset_name="copied")
    run_id, failed = validate(cfg)
    assert isinstance(failed, data_validation.DataValidationError), failed
    message = str(failed)
    assert f"{2 * n} images appear under two or more classes with identical pixels ({names[0]!r} / " \
           f"{names[0] + '_copy'!r}: {2 * n} (e.g. " in message and "\n" not in message  # fmt: skip
    assert not data_validation.schema_path(cfg).exists()
    metrics = tracking.client(cfg).get_run(run_id).data.metrics
    assert metrics["data.conflicting_images"] == 2 * n
    shutil.rmtree(tmp_path / "copied" / f"{names[0]}_copy")
    run_id, fixed = validate(cfg)
    assert isinstance(fixed, data_validation.DataValidation), fixed
    tag = tracking.client(cfg).get_run(run_id).data.tags["gate.data_validation"]
    assert tag.startswith("passed: schema inferred from this run") and tag.endswith(
        "only for images under two classes"
    )
    # Allowed in so many words; blank frames in several classes are the constant-image check's business.
    blank = {
        name: np.concatenate([imgs, np.zeros((2, *imgs.shape[1:]), np.uint8)])
        for name, imgs in copied.items()
    }
    allowed_cfg = folder_cfg(
        write_folder(tmp_path / "blank", blank), dataset_name="blank", max_conflicting_images=2 * n
    )
    run_id, allowed = validate(allowed_cfg)
    assert isinstance(allowed, data_validation.DataValidation), allowed
    assert tracking.client(cfg).get_run(run_id).data.metrics["data.conflicting_images"] == 2 * n


# ------------------------------------------------------------------ lineage leakage
def _exact(images) -> set[bytes]:
    return {np.ascontiguousarray(img).tobytes() for img in np.asarray(images)}


def _log_model(cfg, run_id: str, tmp_path: Path) -> str:
    """A model file in ``run_id`` where the pipeline logs it: that run becomes a checkpoint to start from."""
    from vit_pipeline.mlflow_models import KERAS_ARTIFACT
    from vit_pipeline.model import build_vit

    model = build_vit(make_config("quickstart"), CLASSES, (32, 32, 3), train_images=np.zeros((2, 32, 32, 3)))
    model.save(tmp_path / "model.keras")
    tracking.client(cfg).log_artifact(run_id, str(tmp_path / "model.keras"), KERAS_ARTIFACT)
    return f"runs:/{run_id}/{KERAS_ARTIFACT}"


def test_a_copy_of_this_run_s_own_training_image_is_the_leakage_gate_s_not_the_checkpoint_s(
    tmp_path, originals
):
    """Fine-tuning the champion on its own split again: a test image that copies one of the run's own training
    images was trained on by the checkpoint too, but a model trained from scratch has the same copy. It is
    gate.leakage's finding (recorded); the lineage gate blocked promotion on it."""
    from vit_pipeline import registry

    twins = {
        name: np.concatenate([imgs, imgs[:3]]) for name, imgs in originals.items()
    }  # 3 exact copies each
    root = write_folder(tmp_path / "twins", twins)
    run_a, a = validate(folder_cfg(root, seed=0))
    init = _log_model(folder_cfg(root), run_a, tmp_path)
    cfg = folder_cfg(root, seed=0, init_from=init)
    run_b, b = validate(cfg)
    split = Splits.load(b.data_path)
    own = len({img.tobytes() for img in split.x_test} & _exact(split.x_train))
    assert own > 0  # what the case is about (fixed by the seed)
    assert b.leakage.exact >= own and b.lineage.test == 0 and b.lineage.test_own >= own
    tags = tracking.client(cfg).get_run(run_b).data.tags
    assert tags["gate.lineage"].startswith("passed: 0 test and ")
    assert (
        f"; {b.lineage.test_own} more copy this run's own training or validation images too"
        in tags["gate.lineage"]
    )
    assert registry.blocking_gates(cfg, tags) == []


def test_images_the_checkpoint_trained_on_count_as_leaked_when_the_folder_is_split_again(tmp_path, originals):
    """Fine-tuning on the same folder split with another seed: the checkpoint trained on some test images."""
    from vit_pipeline.data_validation import SEEN_ARTIFACT, ImageHashes

    root = write_folder(tmp_path / "pets", originals)
    run_a, a = validate(folder_cfg(root, seed=0))
    assert "gate.lineage" not in tracking.client(folder_cfg(root)).get_run(run_a).data.tags  # random weights
    split_a = Splits.load(a.data_path)
    client = tracking.client(folder_cfg(root))
    seen_a = ImageHashes.load(client.download_artifacts(run_a, SEEN_ARTIFACT))
    assert len(seen_a) == len(split_a.y_train)  # its training split, not its validation images
    init = _log_model(folder_cfg(root), run_a, tmp_path)

    # Same folder, another seed: some of this run's test and validation images were run A's training images.
    cfg = folder_cfg(root, seed=1, init_from=init)
    run_b, b = validate(cfg)
    split_b = Splits.load(b.data_path)
    in_test = len(_exact(split_b.x_test) & _exact(split_a.x_train))
    in_val = len(_exact(split_b.x_val) & _exact(split_a.x_train))
    assert in_test > 0 and in_val > 0  # what the case is about (fixed by the seeds)
    assert (b.lineage.test, b.lineage.val, b.lineage.seen) == (in_test, in_val, len(seen_a))
    assert b.leakage.from_checkpoint == in_test and b.leakage.leaked == in_test
    run = client.get_run(run_b)
    found = f"{in_test} test and {in_val} validation images are exact or near copies of the {len(seen_a)} images {init} was trained on"
    assert run.data.tags["gate.lineage"] == f"leaked: {found}"
    from vit_pipeline import registry

    assert registry.blocking_gates(cfg, run.data.tags) == [f"test images its checkpoint trained on: {found}"]
    record_only = folder_cfg(root, seed=1, init_from=init, init_leakage_blocks_promotion=False)
    assert registry.blocking_gates(record_only, run.data.tags) == []
    assert run.data.metrics["data.test_seen_by_init"] == in_test
    assert f"({in_test} of them images the checkpoint trained on)" in run.data.tags["gate.leakage"]
    # What run B's weights have seen: its own training split and everything run A's had (its lineage).
    seen_b = ImageHashes.load(client.download_artifacts(run_b, SEEN_ARTIFACT))
    assert {r.tobytes() for r in seen_b.exact} == {r.tobytes() for r in seen_a.exact} | {
        r.tobytes() for r in ImageHashes.of(split_b.x_train).exact
    }
    _, dropped = validate(folder_cfg(root, seed=1, init_from=init, drop_leaked_test=True))
    assert dropped.leakage.dropped == in_test
    assert dropped.lineage.outcome == f"passed: {found} (those test images were dropped)"
    assert registry.blocking_gates(cfg, dropped.tags()) == []
    assert not _exact(Splits.load(dropped.data_path).x_test) & _exact(split_a.x_train)

    # The same seed again: the same split, nothing of the test or validation split was trained on.
    _, same = validate(folder_cfg(root, seed=0, init_from=init))
    assert (same.lineage.test, same.lineage.val, same.leakage.leaked) == (0, 0, 0)

    # A checkpoint that is only a file: its training images are unknown, and the tag says so.
    run_c, c = validate(folder_cfg(root, seed=1, init_from=str(tmp_path / "model.keras")))
    assert not c.lineage.checked and c.leakage.leaked == 0
    assert client.get_run(run_c).data.tags["gate.lineage"].startswith("not checked: ")
    assert "not a model logged by this project" in client.get_run(run_c).data.tags["gate.lineage"]
    # Its own model, fine-tuned further: what it trained on is known, its ancestor's is not, and the check
    # says so instead of passing (the gap is carried down the lineage).
    run_d, d = validate(folder_cfg(root, seed=1, init_from=_log_model(folder_cfg(root), run_c, tmp_path)))
    assert d.lineage.checked and d.lineage.why == (
        f"the training images of an ancestor of runs:/{run_c}/keras-model are not recorded"
    )
    assert (
        client.get_run(run_d).data.tags["gate.lineage"].startswith("partly checked: 0 test and 0 validation")
    )
    assert not ImageHashes.load(client.download_artifacts(run_d, SEEN_ARTIFACT)).complete

    # A damaged file in the checkpoint's run stops the run (fails closed) in one line.
    (tmp_path / "bad" / "data").mkdir(parents=True)
    (tmp_path / "bad" / "data" / "seen_images.npz").write_bytes(b"PK\x03\x04 not really a zip")
    client.log_artifacts(run_a, str(tmp_path / "bad" / "data"), "data")
    with pytest.raises(
        data.DataError, match=r"Could not read image hashes from .*seen_images.npz: BadZipFile"
    ):
        validate(folder_cfg(root, seed=1, init_from=init))


def test_image_hashes_files_are_plain_arrays_and_a_bad_one_fails_in_one_line(tmp_path, real_cut):
    from vit_pipeline.data_validation import ImageHashes

    x = real_cut[0][:40]
    hashes = ImageHashes.of(x)
    back = ImageHashes.load(hashes.save(tmp_path / "h.npz"))
    np.testing.assert_array_equal(back.phash, hashes.phash)
    np.testing.assert_array_equal(back.exact, hashes.exact)
    assert len(ImageHashes.concat(hashes, ImageHashes.of(x[:10]), ImageHashes.of(x[::-1]))) == len(hashes)
    # Objects are never unpickled: a file holding one is refused, as is a file of another shape.
    np.savez(tmp_path / "objects.npz", phash=np.array([object()]), exact=np.zeros((1, 16), np.uint8))
    with pytest.raises(data.DataError, match="Could not read image hashes .*objects.npz"):
        ImageHashes.load(tmp_path / "objects.npz")
    np.savez(tmp_path / "shape.npz", phash=hashes.phash, exact=hashes.exact[:, :8], complete=np.array(True))
    with pytest.raises(data.DataError, match=r"Expected image hashes .* exact \(40, 8\) uint8"):
        ImageHashes.load(tmp_path / "shape.npz")
    np.save(tmp_path / "array.npy", hashes.phash)
    with pytest.raises(data.DataError, match="Could not read image hashes .*array.npy: TypeError"):
        ImageHashes.load(tmp_path / "array.npy")
    assert not ImageHashes.concat(hashes, ImageHashes(hashes.phash[:0], hashes.exact[:0], False)).complete
