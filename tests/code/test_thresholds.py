"""Promotion thresholds: value and change bounds, per class, recorded on the run and the version."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from vit_pipeline import data, registry, robustness, runs, thresholds, tracking
from vit_pipeline.calibration import reliability
from vit_pipeline.config import make_config


def _logits(preds: list[int], n: int) -> np.ndarray:
    return np.eye(n)[preds] * 5.0


def test_value_and_change_checks_name_the_class_that_got_worse():
    cfg = make_config("quickstart", {"min_test_accuracy": 0.5, "min_class_recall": 0.3, "class_min_support": 4,
                                     "max_class_recall_drop": 30})  # fmt: skip
    labels = np.array([0] * 4 + [1] * 4 + [2] * 2)
    names = ["cat", "dog", "eel"]
    champion = _logits([0, 0, 0, 1, 1, 1, 1, 0, 0, 0], 3)  # cat 3/4, dog 3/4: top-1 0.6
    candidate = _logits([0, 0, 0, 0, 1, 1, 1, 1, 0, 0], 3)  # cat 4/4, dog 3/4 (eel 0/2: too few to judge)
    checks = thresholds.value_checks(cfg, candidate, labels, names) + thresholds.change_checks(
        cfg, candidate, champion, labels, names
    )
    assert all(c.held for c in checks), checks
    collapsed = _logits([0, 0, 0, 0, 0, 0, 0, 1, 2, 2], 3)  # top-1 0.7, better, but dog 1/4: 50 points lost
    checks = thresholds.change_checks(cfg, collapsed, champion, labels, names)
    (bad,) = thresholds.failed(checks)
    assert bad.name == "max_class_recall_drop" and "'dog' 0.75 -> 0.25" in bad.detail
    assert thresholds.outcome(checks).startswith("failed: max_class_recall_drop (1 of 2 classes")
    assert thresholds.outcome(checks).endswith("; held: max_accuracy_drop")  # what held is said too
    low = thresholds.value_checks(cfg, collapsed, labels, names)
    assert [c.name for c in thresholds.failed(low)] == ["min_class_recall"] and "'dog' 0.25" in low[1].detail
    # A drop allowance: 10 points lower is allowed when max_accuracy_drop is 10, not when it is 5.
    worse = _logits([0, 0, 1, 1, 1, 1, 0, 0, 0, 0], 3)  # 0.4 against the champion's 0.6 -> 20 points
    allowed = make_config("quickstart", {"max_accuracy_drop": 20})
    assert thresholds.change_checks(allowed, worse, champion, labels, names)[0].held
    strict = make_config("quickstart", {"max_accuracy_drop": 5})
    assert not thresholds.change_checks(strict, worse, champion, labels, names)[0].held


def test_a_per_class_threshold_with_no_class_to_judge_is_not_checked_not_held():
    """The quickstart's 35-37 test images per class are under class_min_support 50: nothing was judged."""
    cfg = make_config("quickstart", {"min_class_recall": 0.3, "max_class_recall_drop": 30})
    labels = np.array([0] * 4 + [1] * 4 + [2] * 2)
    names = ["cat", "dog", "eel"]
    champion, collapsed = _logits([0] * 4 + [1] * 4 + [2] * 2, 3), _logits([0] * 10, 3)
    checks = thresholds.value_checks(cfg, collapsed, labels, names) + thresholds.change_checks(
        cfg, collapsed, champion, labels, names
    )
    recall_checks = [c for c in checks if "class" in c.name]
    assert [c.checked for c in recall_checks] == [False, False]
    text = thresholds.outcome(checks)
    assert text.startswith("failed: max_accuracy_drop"), text  # the whole-split figure still judged it
    assert (
        "min_class_recall not checked (no class has >= 50 of the 10 test images judged, the most 4; --class-min-support"
        in text
    )
    assert "max_class_recall_drop not checked (no class has >= 50" in text and "held" not in text
    only = [c for c in checks if c.name != "max_accuracy_drop"]
    assert thresholds.outcome(only).startswith("none checked; min_class_recall not checked")


def _with_logit_offset(src: Path, dst: Path, offsets: np.ndarray) -> Path:
    """The same model, with ``offsets`` added to its logits (a graph edit: one Add node)."""
    model = onnx.load(str(src))
    graph = model.graph
    out = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(offsets.astype(np.float32), "logit_offsets"))
    graph.node.append(helper.make_node("Add", [f"{out}_raw", "logit_offsets"], [out]))
    onnx.save(model, str(dst))
    return dst


def _with_metadata(src: Path, dst: Path, values: dict[str, str]) -> Path:
    """The same model with metadata entries set (``values`` replace those of the same key)."""
    model = onnx.load(str(src))
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst


def test_the_calibration_floor_judges_the_served_probabilities_and_the_robustness_floor_the_run_s_figure():
    """Right 8 times in 10 with every probability near 1 (ECE 0.2); at T = 20 the confidence is 0.73 (ECE 0.07)."""
    cfg = make_config("quickstart", {"max_test_ece": 0.1, "min_relative_robustness": 0.5})
    labels = np.array([0, 1] * 5)
    logits = _logits([0, 1, 0, 1, 0, 1, 0, 1, 1, 0], 2) * 4  # 20 against 0: confidence 1 - 2e-9
    hot = {c.name: c for c in thresholds.value_checks(cfg, logits, labels, ["a", "b"], 1.0, 0.62)}
    assert not hot["max_test_ece"].held and "expected calibration error 0.2000" in hot["max_test_ece"].detail
    assert hot["min_relative_robustness"].held and "0.6200" in hot["min_relative_robustness"].detail
    cool = {c.name: c for c in thresholds.value_checks(cfg, logits, labels, ["a", "b"], 20.0, 0.42)}
    assert cool["max_test_ece"].held and "0.0689 at temperature 20" in cool["max_test_ece"].detail, cool
    assert not cool["min_relative_robustness"].held
    missing = thresholds.value_checks(cfg, logits, labels, ["a", "b"])
    assert [c.name for c in thresholds.failed(missing)] == ["max_test_ece", "min_relative_robustness"]


@pytest.mark.integration
def test_a_better_candidate_that_collapses_one_class_is_blocked(tmp_path, tiny_overrides):
    """Real models trained on real digits: one slow epoch (the champion) and six (the candidate)."""
    from vit_pipeline.export import build_metadata, export_onnx
    from vit_pipeline.model import load_model
    from vit_pipeline.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {
        **tiny_overrides,
        "patch_size": 4,
        "learning_rate": 0.003,
        "tracking_uri": uri,
        "class_min_support": 20,
    }
    cfg = make_config("quickstart", {**base, "epochs": 6})
    splits = data.prepare(cfg)
    split = registry.TestSplit.from_splits(splits)
    files = {}
    for name, epochs, rate in (("champion", 1, 3e-4), ("candidate", 6, 3e-3)):
        run_cfg = make_config("quickstart", {**base, "epochs": epochs, "learning_rate": rate})
        model = load_model(train(run_cfg, splits, tmp_path / name).model_path)
        meta = build_metadata(splits.class_names, splits.input_shape, dataset=cfg.dataset_tag)
        files[name] = export_onnx(model, tmp_path / f"{name}.onnx", meta)["path"]
    champion = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(files["champion"]), split)
    assert champion.promoted

    # The candidate loses the class the champion knew best: it never predicts it any more.
    champ_recall, support = thresholds.class_recall(
        registry.onnx_logits(files["champion"], split), split.labels, 10
    )
    cand_logits = registry.onnx_logits(files["candidate"], split)
    cand_recall, _ = thresholds.class_recall(cand_logits, split.labels, 10)
    k = int(np.nanargmax(np.where(support >= 20, np.minimum(champ_recall, cand_recall), -1)))
    offsets = np.zeros(10)
    offsets[k] = -1e4
    collapsed = _with_logit_offset(Path(files["candidate"]), tmp_path / "collapsed.onnx", offsets)
    collapsed_top1 = float(np.mean((cand_logits + offsets).argmax(1) == split.labels))
    assert collapsed_top1 > champion.served_test_accuracy  # better overall ...
    assert champ_recall[k] > 0.3  # ... though a class the champion knew is gone

    run_id = runs.create_run(cfg, "test")
    blocked = registry.register_onnx(cfg, run_id, str(collapsed), split)
    assert not blocked.promoted
    assert "failed max_class_recall_drop (1 of" in blocked.reason and splits.class_names[k] in blocked.reason
    client = tracking.client(cfg)
    version = client.get_model_version(blocked.name, blocked.version)
    assert version.tags["gate.thresholds"].startswith("failed: max_class_recall_drop")
    run = client.get_run(run_id)
    assert run.data.tags["gate.thresholds"] == version.tags["gate.thresholds"]
    recorded = json.loads(Path(client.download_artifacts(run_id, "registry/thresholds.json")).read_text())
    assert {c["name"]: c["held"] for c in recorded["checks"]} == {"max_accuracy_drop": True,
                                                                  "max_class_recall_drop": False}  # fmt: skip
    # The same candidate without the collapse becomes champion; a value floor it misses stops it.
    floor = make_config("quickstart", {**base, "min_test_accuracy": 0.999})
    assert not registry.register_onnx(
        floor, runs.create_run(cfg, "test"), str(files["candidate"]), split
    ).promoted
    # The calibration floor reads the temperature the file serves with: the same weights at T = 100 (every
    # probability near 1/10) fail it; the robustness floor reads the run's robustness figure.
    flat = _with_metadata(Path(files["candidate"]), tmp_path / "flat.onnx", {"temperature": "100"})
    assert registry.onnx_temperature(flat) == 100.0 and registry.onnx_temperature(files["candidate"]) == 1.0
    eces = [reliability(cand_logits, split.labels, cfg.ece_bins, t)["ece"] for t in (1.0, 100.0)]
    assert eces[0] < eces[1], eces  # near-uniform probabilities are the worse calibrated here
    calibrated = make_config("quickstart", {**base, "max_test_ece": sum(eces) / 2})
    cold = registry.register_onnx(calibrated, runs.create_run(cfg, "test"), str(flat), split)
    assert not cold.promoted and "failed max_test_ece (expected calibration error" in cold.reason, cold.reason
    brittle = runs.create_run(cfg, "test")
    client.log_metric(brittle, "robustness_relative_accuracy", 0.4)
    sturdy = make_config("quickstart", {**base, "min_relative_robustness": 0.5})
    weak = registry.register_onnx(sturdy, brittle, str(files["candidate"]), split)
    assert (
        not weak.promoted
        and "failed min_relative_robustness (mean top-1 under corruption 0.4000" in weak.reason
    )
    unmeasured = registry.register_onnx(sturdy, runs.create_run(cfg, "test"), str(files["candidate"]), split)
    assert "no robustness_relative_accuracy on the run" in unmeasured.reason and not unmeasured.promoted
    whole = registry.register_onnx(calibrated, runs.create_run(cfg, "test"), str(files["candidate"]), split)
    assert (
        whole.promoted
        and "held" in client.get_model_version(whole.name, whole.version).tags["gate.thresholds"]
    )
    # Against that champion the one-epoch file is also worse under corruption: with every other change threshold
    # open, the robustness one alone stops it, both files measured on the same corrupted test images.
    fragile = make_config("quickstart", {**base, "max_accuracy_drop": 100, "max_class_recall_drop": None,
                                         "max_label_shift": None, "max_robustness_drop": 1.0,
                                         "robustness_images": 120, "corruptions": "gaussian_noise,contrast",
                                         "corruption_severities": (3, 5)})  # fmt: skip
    measured = robustness.measure([registry.onnx_predict(files[name]) for name in ("champion", "candidate")],
                                  np.asarray(split.images[:120]), split.labels[:120], ["gaussian_noise", "contrast"],
                                  [3, 5], fragile.seed)  # fmt: skip
    assert measured[0].mean_accuracy < measured[1].mean_accuracy - 0.01, [m.mean_accuracy for m in measured]
    old = registry.register_onnx(fragile, runs.create_run(cfg, "test"), str(files["champion"]), split)
    assert not old.promoted and (
        f"failed max_robustness_drop (mean top-1 under corruption {measured[0].mean_accuracy:.4f} vs champion's "
        f"{measured[1].mean_accuracy:.4f} on 120 test images x 4 corruptions and severities" in old.reason
    ), old.reason
    gate = client.get_model_version(old.name, old.version).tags["gate.thresholds"]
    assert gate.startswith("failed: max_robustness_drop") and gate.endswith("; held: max_accuracy_drop"), gate


def test_label_shift_is_a_class_the_champion_knew_and_now_misses():
    """Two classes swapped in the data: the champion's recall of each falls from its own split's to 0."""
    cfg = make_config("quickstart")
    labels = np.array([0] * 30 + [1] * 30 + [2] * 4)
    names = ["three", "eight", "eel"]
    swapped = _logits([1] * 30 + [0] * 30 + [2] * 4, 3)  # what it calls three is now filed under eight
    own = {"three": (0.9, 30), "eight": (0.8, 30), "eel": (1.0, 4)}
    check = thresholds.label_shift_check(cfg, swapped, labels, names, own)
    assert not check.held and "2 of 3 classes" in check.detail and "'three' 0.90 -> 0.00" in check.detail
    # Noise is not a shift: a class of 4 images whose intervals overlap, or a drop within the threshold.
    noisy = _logits([0] * 30 + [1] * 30 + [0, 0, 2, 2], 3)
    assert thresholds.label_shift_check(cfg, noisy, labels, names, own).held
    assert thresholds.label_shift_check(
        cfg, noisy, labels, names, {**own, "eel": (1.0, 40)}
    ).held  # 50 points


def test_a_label_shift_in_one_part_of_the_test_split_is_not_diluted_by_the_other():
    """60 'cat' test images the champion trained on (it knows them) and 40 new dog photos filed as 'cat': on all
    100 the champion's recall is 0.62 (a 28-point drop, held); on the 40 it is 0.05 (failed)."""
    cfg = make_config("quickstart")
    labels = np.array([0] * 100 + [1] * 50)
    names = ["cat", "dog"]
    predicted = _logits([0] * 60 + [0] * 2 + [1] * 38 + [1] * 50, 2)
    own = {"cat": (0.9, 50), "dog": (0.9, 50)}
    assert thresholds.label_shift_check(cfg, predicted, labels, names, own).held  # one part: diluted
    parts = [
        ("test images it trained on", np.arange(60)),
        ("test images it did not train on", np.arange(60, 150)),
    ]
    check = thresholds.label_shift_check(cfg, predicted, labels, names, own, parts)
    assert not check.held and "'cat' 0.90 -> 0.05 on 40 test images it did not train on" in check.detail


@pytest.mark.integration
def test_the_champion_is_compared_on_images_it_did_not_train_on(tmp_path):
    """Another split seed puts the champion's training images in the candidate's test split."""
    import csv

    from tests.conftest import constant_classifier, labelled_split
    from vit_pipeline.data_validation import SEEN_ARTIFACT, ImageHashes

    cfg = make_config("quickstart", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                     "max_class_recall_drop": None})  # fmt: skip
    client = tracking.client(cfg)
    split = labelled_split([40, 30])  # 40 of class 0, 30 of class 1
    names = split.class_names

    def champion_run(recall: dict[str, float], seen: slice = slice(0, 30)) -> str:
        run_id = runs.create_run(cfg, "test")
        folder = tmp_path / run_id
        (folder / "data").mkdir(parents=True)
        (folder / "evaluation").mkdir()
        ImageHashes.of(split.images[seen]).save(folder / SEEN_ARTIFACT)  # default: 30 of the class-0 images
        with open(folder / "evaluation" / "per_class_accuracy.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["class_index", "class_name", "support", "recall"])
            rows.writerows([i, n, 30, recall[n]] for i, n in enumerate(names))
        client.log_artifacts(run_id, str(folder / "data"), "data")
        client.log_artifacts(run_id, str(folder / "evaluation"), "evaluation")
        return run_id

    always0 = constant_classifier(tmp_path / "zero.onnx", 2, 0, names)  # the champion: 40 of 70 overall
    always1 = constant_classifier(tmp_path / "one.onnx", 2, 1, names)  # the candidate: 30 of 70 overall
    assert registry.register_onnx(
        cfg, champion_run({"class0": 1.0, "class1": 0.0}), str(always0), split
    ).promoted
    candidate = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(always1), split)
    # On the 40 images neither trained on, the candidate has 30 and the champion 10.
    assert candidate.promoted, candidate.reason
    assert candidate.reason == ("served top-1 0.7500 >= champion v1's 0.2500 on the same 40 test images it did not "
                                "train on (30 of the 70 were in champion v1's training split and are left out); 30 images only it got "
                                "right, 10 only the champion (McNemar p=0.0022)")  # fmt: skip
    assert candidate.champion_test_accuracy == 0.25
    tags = client.get_model_version(
        candidate.name, candidate.version
    ).tags  # both figures on the same 40 images
    assert (tags["champion_test_accuracy_same_split"], tags["served_test_accuracy_same_split"],
            tags["compared_test_images"], tags["test_images"]) == ("0.250000", "0.750000", "40", "70")  # fmt: skip

    # A champion that recognised class 1 on its own split and misses all of it here: the labels changed.
    assert registry.register_onnx(
        cfg, champion_run({"class0": 0.0, "class1": 0.9}), str(always0), split
    ).promoted
    shifted = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(always1), split)
    assert not shifted.promoted, shifted.reason
    assert "failed max_label_shift (1 of 2 classes the champion recognised" in shifted.reason
    assert (
        "'class1' 0.90 -> 0.00 on 30 test images it did not train on: relabelled or re-sorted data?"
        in shifted.reason
    )

    # The same, when the relabelled class's test images are the champion's own training images but one (the
    # folder split again under the new names): on that one image the intervals overlap and the check held; on
    # the whole split the champion's recall of it is plainly gone (it learnt the old labels).
    forced = make_config("quickstart", {"tracking_uri": cfg.tracking_uri, "promotion_policy": "always"})
    assert registry.register_onnx(
        forced, champion_run({"class0": 0.0, "class1": 0.9}, seen=slice(40, 69)), str(always0), split
    ).promoted
    hidden = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(always1), split)
    assert (
        "failed max_label_shift (1 of 2 classes" in hidden.reason and "'class1' 0.90 -> 0.00" in hidden.reason
    )

    # A champion that trained on every test image cannot be compared: it stays.
    run_id = runs.create_run(cfg, "test")
    ImageHashes.of(split.images).save(tmp_path / "seen_images.npz")
    client.log_artifact(run_id, str(tmp_path / "seen_images.npz"), "data")
    assert registry.register_onnx(forced, run_id, str(always0), split).version == "7"
    blocked = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(always1), split)
    assert not blocked.promoted and blocked.reason == (
        "not comparable: champion v7 trained on all 70 of this run's test images; not replaced"
    )

    # The robustness comparison is made on the images the champion did not train on too (40, not 70).
    assert registry.register_onnx(
        forced, champion_run({"class0": 1.0, "class1": 0.0}), str(always0), split
    ).promoted
    robust = make_config("quickstart", {"tracking_uri": cfg.tracking_uri, "max_class_recall_drop": None,
                                        "max_robustness_drop": 0, "corruptions": "contrast",
                                        "corruption_severities": (1,)})  # fmt: skip
    judged = registry.register_onnx(robust, run_id := runs.create_run(cfg, "test"), str(always1), split)
    assert judged.promoted, judged.reason
    recorded = json.loads(Path(client.download_artifacts(run_id, "registry/thresholds.json")).read_text())
    (check,) = [c for c in recorded["checks"] if c["name"] == "max_robustness_drop"]
    assert "0.7500 vs champion's 0.2500 on 40 test images x 1 corruptions" in check["detail"], check


def test_a_small_gap_on_a_small_split_is_said_to_be_within_chance():
    """0.45 vs 0.41 on 120 images promoted the candidate as 'better'; the reason now says what chance allows."""
    rng = np.random.default_rng(0)
    old = rng.random(120) < 0.41
    new = old.copy()
    new[np.flatnonzero(~old)[:5]] = True  # 5 more right, none lost
    assert (
        thresholds.paired_difference(new, old)
        == "5 images only it got right, 0 only the champion (McNemar p=0.062; within chance)"
    )
    assert thresholds.paired_difference(old, old) == "both right on exactly the same images"


def test_the_robustness_change_threshold_compares_the_same_corrupted_images():
    cfg = make_config("quickstart", {"max_robustness_drop": 5})
    rows = [{"corruption": "contrast", "severity": s, "accuracy": a} for s, a in ((1, 0.6), (5, 0.2))]
    champion = robustness.Robustness(50, 0.8, rows)
    worse = robustness.Robustness(50, 0.9, [{**r, "accuracy": r["accuracy"] - 0.08} for r in rows])
    check = thresholds.robustness_change_check(cfg, worse, champion)
    assert not check.held and "0.3200 vs champion's 0.4000 on 50 test images x 2" in check.detail
    assert "8.00 points lower (at most 5)" in check.detail
    slightly = robustness.Robustness(50, 0.9, [{**r, "accuracy": r["accuracy"] - 0.04} for r in rows])
    assert thresholds.robustness_change_check(cfg, slightly, champion).held
    assert "max_robustness_drop" in thresholds.change_names(cfg)
    assert "max_robustness_drop" not in thresholds.change_names(make_config("quickstart"))
