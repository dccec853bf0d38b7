"""The class split of the transfer experiment: disjoint classes, capped target images, image folders."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import CIFAR_CUT
from vit_pipeline.data import read_cifar100, read_image_folder
from vit_pipeline.errors import DataError
from vit_pipeline.experiments import top1_by_minutes
from vit_pipeline.transfer_data import pick_target_classes, split_by_classes


def test_target_and_source_classes_are_disjoint_and_the_target_is_capped(tmp_path):
    x_train, y_train, x_test, y_test, names = read_cifar100(CIFAR_CUT)
    split = split_by_classes(CIFAR_CUT, tmp_path, target_classes=3, target_train_per_class=2, seed=0)
    assert not set(split.source_classes) & set(split.target_classes)
    assert sorted(split.source_classes + split.target_classes) == sorted(set(names))
    images, labels, target_names, skipped = read_image_folder(split.target_root / "train", 32)
    assert sorted(target_names) == split.target_classes and skipped == 0
    assert np.bincount(labels).max() <= 2
    # Pixels survive the PNG round trip exactly; test images of the target classes are all kept.
    test_images, test_labels, _, _ = read_image_folder(split.target_root / "test", 32)
    wanted = np.isin(np.array(names)[y_test], split.target_classes)
    assert len(test_labels) == wanted.sum()
    assert {img.tobytes() for img in test_images} == {img.tobytes() for img in x_test[wanted]}
    source_images, _, source_names, _ = read_image_folder(split.source_root / "train", 32)
    assert sorted(source_names) == sorted(split.source_classes)
    assert len(source_images) == np.isin(np.array(names)[y_train], split.source_classes).sum()


def test_the_draw_is_seeded_and_bounded():
    names = [f"c{i}" for i in range(20)]
    assert pick_target_classes(names, 5, 1) == pick_target_classes(names, 5, 1)
    assert pick_target_classes(names, 5, 1) != pick_target_classes(names, 5, 2)
    with pytest.raises(DataError, match="target classes"):
        pick_target_classes(names, 20, 0)


def test_time_to_accuracy_reads_the_best_within_each_budget():
    seconds = [120.0, 120.0, 120.0, 120.0, 120.0, 300.0]  # minutes 2, 4, 6, 8, 10, 15
    val = [0.1, 0.3, 0.2, 0.4, 0.35, 0.5]
    assert top1_by_minutes(seconds, val, marks=(5, 10, 30)) == {"5": 0.3, "10": 0.4, "30": None}
    assert top1_by_minutes([], [], marks=(5,)) == {"5": None}


def test_transfer_table_states_the_gain_against_the_best_from_scratch_row_of_each_budget():
    from vit_pipeline.experiments import TransferRow, transfer_markdown

    def row(label, init, acc, first, median):
        return TransferRow(
            label, f"id-{label}", init, 30, 450, first, median, 5.0, acc, 0.9, {"5": 0.4, "10": None}
        )

    table = transfer_markdown({
        "30 epochs": [row("scratch", "None", 0.40, 20.0, 8.0), row("seed", "None", 0.30, 30.0, 9.0),
                      row("tuned", "models:/src/1", 0.575, 22.0, 7.6)],
        "budget": [row("scratch b", "None", 0.37, 20.0, 8.0), row("seed b", "None", 0.47, 25.0, 9.0),
                   row("tuned b", "models:/src/1", 0.565, 20.0, 8.0)],
    })  # fmt: skip
    assert (
        "- tuned vs scratch: **+17.50 points** test top-1; epoch time against scratch (same architecture): "
        "first epoch 1.10x, later epochs (median) 0.95x." in table
    )
    # Where another preset won, the gain is over it (not the flattering +19.50), the speed against the same
    # architecture.
    assert (
        "- tuned b vs seed b: **+9.50 points** test top-1 (the best from scratch here; +19.50 over scratch b); "
        "epoch time against scratch b (same architecture): first epoch 1.00x" in table
    )
    assert "seed vs" not in table and "seed b vs" not in table  # only fine-tuned rows are compared
    assert "| tuned | 40.00% | not run that long | 5.0 |" in table
