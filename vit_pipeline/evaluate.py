"""Evaluation: test top-1/top-5, per-class accuracy, confusion matrix and plots."""

from __future__ import annotations

import csv
import io
import json
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline.fsutil import atomic_path, write_text

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext


@dataclass
class EvalResult:
    """Headline test metrics and the paths of the written artifacts."""

    test_accuracy: float
    test_top5_accuracy: float
    test_loss: float
    num_test_images: int
    artifacts: dict[str, str]
    # The per-class rows of per_class_accuracy.csv, for the MLflow table; not in to_dict (flow results).
    per_class: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        return {
            "test_accuracy": self.test_accuracy,
            "test_top5_accuracy": self.test_top5_accuracy,
            "test_loss": self.test_loss,
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["per_class"]
        return out


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 images, in inference mode (no augmentation, no dropout)."""
    import tensorflow as tf

    fn = _inference_fns.get(model)
    if fn is None:  # one traced function per model: a new one per call retraces every time
        ref = weakref.ref(model)  # the cache must not keep the model alive
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)  # any batch size: one trace
        fn = _inference_fns[model] = tf.function(
            lambda batch: ref()(batch, training=False), input_signature=[spec]
        )
    out = [fn(tf.constant(x[i : i + batch_size], tf.float32)).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out, axis=0)


_inference_fns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the ``k`` highest logits (scikit-learn)."""
    from sklearn.metrics import accuracy_score, top_k_accuracy_score

    num_classes = logits.shape[1]
    if k >= num_classes:
        return 1.0
    if k == 1 or num_classes == 2:  # sklearn's binary case wants 1-D scores
        return float(accuracy_score(labels, logits.argmax(axis=1)))
    return float(top_k_accuracy_score(labels, logits, k=k, labels=np.arange(num_classes)))


def scores(logits: np.ndarray, labels: np.ndarray | None = None, reference: np.ndarray | None = None) -> dict:
    """top-1/top-5 against ``labels`` and top-1 agreement with ``reference`` logits (each where given).

    The one place the export's candidate gate, the registry's champion rule and the
    benchmark score a file's logits.
    """
    out: dict[str, float] = {}
    if labels is not None:
        out["top1"] = topk_accuracy(logits, labels, 1)
        out["top5"] = topk_accuracy(logits, labels, 5)
    if reference is not None:
        out["top1_agreement"] = float(np.mean(logits.argmax(1) == reference.argmax(1)))
    return out


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy from logits (scikit-learn's log loss on the softmax)."""
    from sklearn.metrics import log_loss
    from vit_consumer.contract import softmax

    return float(log_loss(labels, softmax(logits), labels=np.arange(logits.shape[1])))


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, preds, labels=np.arange(num_classes))


def per_class_rows(cm: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Per class: support, correct, accuracy (= recall), precision, recall, F1 (scikit-learn)."""
    from sklearn.metrics import precision_recall_fscore_support

    classes = np.arange(len(class_names))
    # Expand the confusion matrix back to (label, prediction) pairs, weighted by count.
    true, pred = np.nonzero(cm)
    weights = cm[true, pred]
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=classes, sample_weight=weights, zero_division=np.nan
    )
    correct = np.diag(cm)
    return [
        {"class_index": i, "class_name": name, "support": int(cm[i].sum()), "correct": int(correct[i]),
         "accuracy": float(recall[i]), "precision": float(precision[i]), "recall": float(recall[i]),
         "f1": float(f1[i])}
        for i, name in enumerate(class_names)
    ]  # fmt: skip


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def _save_fig(fig, path: Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix; sized so 100 class names stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    side = max(6.0, 0.22 * n + 3)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fontsize = 10 if n <= 20 else 7
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (row-normalised), {n} classes")
    if n <= 20:  # cell numbers only where they fit
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save_fig(fig, path, dpi=110)


def plot_learning_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss, top-1 and top-5 per epoch, training vs validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "accuracy", "top5_accuracy") if k in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save_fig(fig, path)


def plot_patches(image: np.ndarray, image_size: int, patch_size: int, path: Path, title: str = "") -> Path:
    """The seed's picture: one image (resized as the model does) beside its patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR))
    n = image_size // patch_size
    fig = plt.figure(figsize=(10, 5))
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(resized)
    ax.set_title(f"{title} ({image_size}x{image_size})")
    ax.axis("off")
    grid = fig.add_gridspec(n, n, left=0.55, right=0.95, wspace=0.08, hspace=0.08)
    for r in range(n):
        for c in range(n):
            sub = fig.add_subplot(grid[r, c])
            sub.imshow(resized[r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size])
            sub.axis("off")
    fig.suptitle(f"{n * n} patches of {patch_size}x{patch_size}")
    return _save_fig(fig, path)


def evaluate(
    model,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: list[str],
    out_dir: str | Path,
    history: dict[str, list[float]] | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
) -> EvalResult:
    """Computes test metrics and writes the CSV, JSON and PNG artifacts to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logits = predict_logits(model, x_test)
    preds = logits.argmax(axis=1)
    cm = confusion(y_test, preds, len(class_names))
    result = EvalResult(
        test_accuracy=float(np.mean(preds == y_test)),
        test_top5_accuracy=topk_accuracy(logits, y_test, 5),
        test_loss=cross_entropy(logits, y_test),
        num_test_images=int(len(y_test)),
        artifacts={},
        per_class=per_class_rows(cm, class_names),
    )
    arts = result.artifacts
    arts["per_class_accuracy"] = str(write_csv(out_dir / "per_class_accuracy.csv", result.per_class))
    arts["confusion_matrix_csv"] = str(write_text(out_dir / "confusion_matrix.csv",
                                                  _matrix_csv(cm, class_names)))  # fmt: skip
    arts["confusion_matrix"] = str(plot_confusion(cm, class_names, out_dir / "confusion_matrix.png"))
    if history:
        arts["learning_curves"] = str(plot_learning_curves(history, out_dir / "learning_curves.png"))
    if image_size and patch_size:
        arts["patches"] = str(
            plot_patches(x_test[0], image_size, patch_size, out_dir / "patches.png", class_names[y_test[0]])
        )
    arts["metrics"] = str(write_text(out_dir / "test_metrics.json", json.dumps(result.metrics(), indent=1)))
    return result


def _matrix_csv(cm: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true\\predicted", *class_names])
    for name, row in zip(class_names, cm, strict=True):
        writer.writerow([name, *row.tolist()])
    return buf.getvalue()


# --------------------------------------------------------------------- the stage
def run(ctx: StageContext, data_path: str, model_path: str, history_path: str | None = None) -> EvalResult:
    """The evaluation stage: test metrics, per-class table, confusion matrix, learning curves, patch picture."""
    from vit_pipeline.data import Splits
    from vit_pipeline.model import load_model

    cfg = ctx.cfg
    splits = Splits.load(data_path)
    history = json.loads(Path(history_path).read_text()) if history_path else None
    result = evaluate(
        load_model(model_path), splits.x_test, splits.y_test, splits.class_names, ctx.work_dir / "evaluation",
        history=history, image_size=cfg.image_size, patch_size=cfg.patch_size,
    )  # fmt: skip
    ctx.log.metrics(result.metrics())
    _on_logged_model(ctx, {k: v for k, v in result.metrics().items() if k.startswith("test_")})
    ctx.log.artifacts(result.artifacts.values(), "evaluation")
    ctx.log.table(result.per_class, "evaluation/per_class_metrics.json")
    return result


def _on_logged_model(ctx: StageContext, figures: dict[str, float]) -> None:
    """The test figures on the Keras logged model the train stage made of this run's model (its page in the
    experiment's Models tab showed no test figure: it was logged before evaluation). A model from elsewhere
    (``vit-pipeline evaluate FILE``) has none."""
    from vit_pipeline.train import KERAS_MODEL_TAG

    ctx.log.model_metrics(ctx.log.client.get_run(ctx.run_id).data.tags.get(KERAS_MODEL_TAG), figures)
