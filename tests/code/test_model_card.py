"""The model card reads what a run recorded; a run without the gates' records still gets a card."""

from __future__ import annotations

import re

import pytest

from tests.conftest import constant_classifier, labelled_split
from vit_pipeline import model_card, registry, runs, tracking
from vit_pipeline.config import make_config

pytestmark = pytest.mark.integration  # a real MLflow store and registry


def test_a_bare_run_gets_a_card_that_says_what_was_not_measured(tmp_path):
    cfg = make_config("quickstart", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    split = labelled_split([30, 20, 10])
    run_id = runs.create_run(cfg, "test")
    onnx = constant_classifier(tmp_path / "c.onnx", 3, 0)
    registration = registry.register_onnx(cfg, run_id, str(onnx), split)
    full, short = model_card.card(tracking.client(cfg), run_id, registration)
    assert full.startswith(f"# Model card: vit-digits v{registration.version}")
    # Dated and in the past tense: the card is not rewritten when the alias moves on (it said "Status: champion").
    assert re.search(r"\*\*Decision at registration \(20\d\d-\d\d-\d\d \d\d:\d\d UTC\):\*\* promoted to "
                     r"champion: no champion yet\. Which version serves now: the registry's `@champion`", full)  # fmt: skip
    assert "Status" not in full
    assert "top-1 **50.00%** (95% interval" in full  # class 0 is 30 of 60 images
    assert full.count("Not measured.") == 3  # calibration, robustness, speed
    assert "- **Infra validation:** not run" in full and "Trained from random weights." in full
    commit = tracking.client(cfg).get_run(run_id).data.tags["mlflow.source.git.commit"]
    assert f"- Code: commit `{commit[:12]}`" in full  # which code trained it (runs.source_tags)
    # Recorded even when nothing could be checked, and why: the change thresholds need a champion.
    nothing = "none checked; max_accuracy_drop, max_class_recall_drop, max_label_shift not checked (no champion to compare with)"
    assert f"- **Thresholds:** {nothing}" in full
    run = tracking.client(cfg).get_run(run_id)
    version = tracking.client(cfg).get_model_version("vit-digits", registration.version)
    assert run.data.tags["gate.thresholds"] == version.tags["gate.thresholds"] == nothing
    # Against a champion the change thresholds apply; with the policy "never" they are not looked at.
    again = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(onnx), split)
    assert (
        tracking.client(cfg)
        .get_model_version("vit-digits", again.version)
        .tags["gate.thresholds"]
        .startswith("held: max_accuracy_drop")
    )
    never = make_config("quickstart", {"tracking_uri": cfg.tracking_uri, "promotion_policy": "never"})
    third = registry.register_onnx(never, runs.create_run(never, "test"), str(onnx), split)
    gate = tracking.client(cfg).get_model_version("vit-digits", third.version).tags["gate.thresholds"]
    assert gate == "not evaluated (policy 'never')", gate
    assert short == full  # no per-class table to leave out
    html = model_card.to_html(full, "t")
    assert html.startswith("<!doctype html>") and "<h2>Limitations</h2>" in html and "<table>" not in html


def test_a_threshold_that_checked_nothing_is_not_shown_as_held():
    assert model_card._held({"held": True, "checked": False}) == "not checked"
    assert model_card._held({"held": True}) == "yes" and model_card._held({"held": False}) == "**no**"


def test_the_code_line_says_what_is_known_of_the_code():
    tags = {"mlflow.source.git.commit": "a" * 40, "mlflow.source.git.branch": "main",
            runs.DIRTY: "true", runs.RESUMED_COMMIT: "b" * 40}  # fmt: skip
    assert model_card._code_line(tags) == (
        f"- Code: commit `{'a' * 12}` on `main` with uncommitted edits; resumed by commit `{'b' * 12}`."
    )
    assert model_card._code_line({"vit_pipeline.version": "0.1.0"}) == (
        "- Code: vit-pipeline 0.1.0 (not run from a git checkout)."
    )


def test_the_lowest_recall_table_says_how_many_classes_it_cannot_show():
    """Ten rows at recall 0 picked among 66 hid the 56 others; a class never predicted has no precision."""
    from types import SimpleNamespace

    rows = [{"class_name": f"c{i}", "support": "2", "recall": "0.0" if i < 12 else "1.0",
             "precision": "nan" if i < 5 else "1.0", "f1": "0.0"} for i in range(20)]  # fmt: skip
    rec = SimpleNamespace(metrics={}, params={}, csv=lambda path: rows)
    lines, _ = model_card._metrics_section(rec, SimpleNamespace(test_images=40, served_test_accuracy=0.4))
    assert ("Lowest recall of 20 classes (the full table is in the run's `model_card/model_card.md`); 12 of them "
            "have recall 0; 5 are never predicted (precision nan: undefined):") in lines  # fmt: skip


def test_uneven_classes_get_their_balanced_accuracy_and_the_majority_baseline():
    """61% top-1 on a test split that is 55% one class said little: the card says what answering that class
    alone would score, the mean recall, and which classes had no test image at all (a "nan" row before)."""
    from types import SimpleNamespace

    rows = [{"class_name": "apple", "support": "24", "recall": "0.9", "precision": "0.6", "f1": "0.7"},
            *[{"class_name": f"c{i}", "support": "2", "recall": "0.5" if i < 5 else "0.0", "precision": "0.5",
               "f1": "0.5"} for i in range(10)],
            {"class_name": "bottle", "support": "0", "recall": "nan", "precision": "nan", "f1": "nan"}]  # fmt: skip
    rec = SimpleNamespace(metrics={}, params={}, csv=lambda path: rows)
    lines, per_class = model_card._metrics_section(
        rec, SimpleNamespace(test_images=44, served_test_accuracy=0.61)
    )
    assert ("Balanced accuracy (mean recall of the 11 classes with test images) 30.91%; always answering the "
            "largest class ('apple', 24 of 44 test images) would score 54.55%. Not evaluated (no test image): "
            "1 class(es), 'bottle'.") in lines  # fmt: skip
    assert "Lowest recall of 11 classes" in " ".join(lines) and "bottle" in " ".join(per_class)


def test_the_data_section_says_how_many_files_were_left_out():
    """Six unreadable files were skipped by prepare; the card showed the folder's counts as if all were used."""
    from types import SimpleNamespace

    split = {"count": 10, "class_counts": {"a": 5, "b": 5}, "image_shape": [32, 32, 3],
             "channel_mean": [1, 2, 3], "channel_std": [1, 1, 1], "constant_images": 0}  # fmt: skip
    stats = {"splits": {"train": split}, "source_files": {"files": 606, "unreadable": 3, "modes": {"RGB": 600},
                                                          "min_side": 17, "median_width": 32, "median_height": 32}}  # fmt: skip
    rec = SimpleNamespace(params={"data.skipped_files": "6"}, tags={}, json=lambda path: stats)
    text = "\n".join(model_card._data_section(rec))
    assert "Source files: 606 (6 unreadable, left out of every split), modes from their headers" in text


def test_the_version_description_gives_up_whole_sections_before_the_lineage_and_limitations():
    """A card over the registry's 5,000 characters lost its Lineage and Limitations (cut at the end)."""
    sections = {"head": ["# Model card: m v3", "", "**Decision at registration:** promoted", ""],
                "data": ["## Data", "", "x" * 3000, ""], "metrics": ["## Metrics", "", "top-1", ""],
                "calibration": ["## Calibration", "", "c" * 1900, "", "## Robustness", "", "r", ""],
                "checks": ["## Thresholds and release checks", "", "held", ""],
                "speed": ["## Speed on the training machine", "", "s" * 300, ""],
                "lineage": ["## Lineage", "", "- seed 7", "## Limitations", "", "- +/-1.7 points", ""]}  # fmt: skip
    short = model_card._within_limit(sections)
    assert len(short) <= model_card.DESCRIPTION_LIMIT and short.endswith("- +/-1.7 points\n")
    assert "x" * 3000 not in short and "s" * 300 not in short and "c" * 1900 in short  # two sections sufficed
    assert "## Data\n\nIn the full card (the run's `model_card/model_card.md`)." in short
    sections["metrics"][2] = "m" * 4000
    shorter = model_card._within_limit(sections)
    assert "## Calibration and robustness\n\nIn the full card" in shorter and "## Robustness" not in shorter
    assert "- +/-1.7 points" in shorter and len(shorter) <= model_card.DESCRIPTION_LIMIT
    sections["checks"][2] = (
        "f" * 3000
    )  # long failure details: a cut is still needed, and made before the lineage
    cut = model_card._within_limit(sections)
    assert len(cut) <= model_card.DESCRIPTION_LIMIT and cut.endswith("## Limitations\n\n- +/-1.7 points\n")
    assert "(cut: the whole card is in the run)" in cut


def test_a_gate_says_whether_a_threshold_made_it_a_release_condition():
    """Set in the config and checked at registration; set and not checked (the policy 'never', a blocked version)
    said "A release condition" of thresholds that never ran."""
    from types import SimpleNamespace

    def record(params, checks):
        return SimpleNamespace(params=params, metrics={}, json=lambda path: {"checks": checks})

    params = {"max_test_ece": "0.05", "min_relative_robustness": "None", "max_robustness_drop": "2.0"}
    rec = record(
        params, [{"name": "max_test_ece", "held": False}, {"name": "max_robustness_drop", "held": True}]
    )
    assert model_card._condition(rec, "max_test_ece") == (
        "_A release condition: `--max-test-ece 0.05`, failed (see Thresholds)._"
    )
    assert model_card._condition(rec, "min_relative_robustness", "max_robustness_drop") == (
        "_A release condition: `--max-robustness-drop 2.0`, held (see Thresholds)._"
    )
    unchecked = record(params, [])  # the policy 'never', a blocked version: no check ran
    assert model_card._condition(unchecked, "max_test_ece") == (
        "_Set (`--max-test-ece 0.05`) but not checked for this version (see Thresholds)._"
    )
    assert model_card._condition(record({}, []), "min_relative_robustness", "max_robustness_drop") == (
        "_Recorded, not a release condition (`--min-relative-robustness`, `--max-robustness-drop` would make it one)._"
    )
    assert "not rescaled" in model_card._probabilities(SimpleNamespace(metrics={"temperature": 1.0}))
    assert "temperature 1.300" in model_card._probabilities(SimpleNamespace(metrics={"temperature": 1.3}))
