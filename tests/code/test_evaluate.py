import numpy as np
from PIL import Image

from vit_pipeline.evaluate import (
    confusion,
    cross_entropy,
    per_class_rows,
    plot_confusion,
    plot_learning_curves,
    plot_patches,
    topk_accuracy,
)


def test_topk_and_loss():
    logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0], [2.0, 3.0, 1.0]])
    labels = np.array([0, 1, 2])
    assert topk_accuracy(logits, labels, 1) == 1 / 3
    assert topk_accuracy(logits, labels, 2) == 2 / 3
    assert topk_accuracy(logits, labels, 5) == 1.0  # k capped at the class count
    uniform = np.zeros((2, 4))
    assert np.isclose(cross_entropy(uniform, np.array([0, 3])), np.log(4))


def test_confusion_and_per_class():
    cm = confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    rows = per_class_rows(cm, ["a", "b", "c"])
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 0.0]
    assert rows[1]["precision"] == 1 / 3
    # The same figures as scikit-learn's report on the underlying labels.
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f1, _ = precision_recall_fscore_support(
        [0, 0, 1, 2], [0, 1, 1, 1], labels=[0, 1, 2], zero_division=0
    )
    assert [row["recall"] for row in rows] == list(r) and [row["f1"] for row in rows] == list(f1)
    assert rows[0]["precision"] == p[0] == 1.0 and np.isnan(rows[2]["precision"])  # class c never predicted


def test_plots_are_real_pngs(tmp_path):
    names = [f"class_{i}" for i in range(100)]
    rng = np.random.default_rng(0)
    cm = confusion(rng.integers(0, 100, 500), rng.integers(0, 100, 500), 100)
    paths = [
        plot_confusion(cm, names, tmp_path / "cm.png"),
        plot_learning_curves(
            {"loss": [2, 1], "val_loss": [2.1, 1.5], "accuracy": [0.1, 0.3]}, tmp_path / "lc.png"
        ),
        plot_patches(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 72, 6, tmp_path / "p.png", "cat"),
    ]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG"
    with Image.open(paths[0]) as img:  # big enough for 100 readable labels
        assert min(img.size) > 2000
