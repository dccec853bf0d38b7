"""The robustness stage (after calibration): accuracy under the corruptions of CIFAR-100-C.

Served images are not the clean test split: they are noisy, blurred, JPEG-compressed, too
bright or flat. Hendrycks and Dietterich (2019, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations") define 19 corruptions at five severities; CIFAR-100-C
applies them to the CIFAR-100 test set. This stage applies them to the run's *own* test split
(any dataset, any image size) with ``imagecorruptions-imaug``, the maintained fork of the
authors' ``imagecorruptions`` package (the original breaks on numpy 2 and scikit-image
0.26: see FACTS), so the figures are comparable across runs of one dataset.

``corruptions`` (default: Gaussian noise, defocus blur, JPEG, brightness, contrast) x
``corruption_severities`` (1-5) on the first ``robustness_images`` test images (the same
images every run: the test split is stored in a seeded order); each cell is seeded, so a run
is reproducible. The severities are the package's (ImageNet's); CIFAR-100-C used milder
ones, so absolute figures here are lower than published CIFAR-100-C numbers.

Outcome: metrics ``robustness_clean_accuracy``, ``robustness_mean_accuracy`` (mean over every
corruption and severity), ``robustness_relative_accuracy`` (their ratio) and one per corruption;
a table and a plot under ``robustness/``; run tag ``gate.robustness``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline.fsutil import write_text

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext


MIN_SIDE = 32  # imagecorruptions refuses smaller images


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``images`` (uint8 NHWC) under one corruption at one severity, reproducibly.

    Images under 32 pixels a side (28x28 digits) are corrupted at 32 and brought back to their size (bilinear
    both ways): the package refuses them, and the stage failed after the whole training.
    """
    from imagecorruptions import corrupt
    from PIL import Image

    h, w = images.shape[1:3]
    size = (max(w, MIN_SIDE), max(h, MIN_SIDE))

    def one(img: np.ndarray) -> np.ndarray:
        if (w, h) == size:
            return np.asarray(corrupt(img, corruption_name=corruption, severity=severity))
        big = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        out = np.clip(np.asarray(corrupt(big, corruption_name=corruption, severity=severity)), 0, 255)
        return np.asarray(Image.fromarray(out.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))

    # The package draws from numpy's global generator: seed it per cell, put it back after.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = [one(img) for img in images]
    finally:
        np.random.set_state(state)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@dataclass
class Robustness:
    """Accuracy on clean and corrupted copies of the same test images."""

    images: int
    clean_accuracy: float
    rows: list[dict[str, Any]]  # corruption, severity, accuracy
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean([r["accuracy"] for r in self.rows]))

    def per_corruption(self) -> dict[str, float]:
        names = dict.fromkeys(r["corruption"] for r in self.rows)
        return {n: float(np.mean([r["accuracy"] for r in self.rows if r["corruption"] == n])) for n in names}

    def metrics(self) -> dict[str, float]:
        out = {"robustness_clean_accuracy": self.clean_accuracy, "robustness_mean_accuracy": self.mean_accuracy,
               "robustness_relative_accuracy": self.mean_accuracy / self.clean_accuracy if self.clean_accuracy else 0.0}  # fmt: skip
        out.update({f"robustness_{name}_accuracy": acc for name, acc in self.per_corruption().items()})
        return out

    @property
    def outcome(self) -> str:
        worst = min(self.per_corruption().items(), key=lambda kv: kv[1])
        return (f"mean corruption accuracy {self.mean_accuracy:.4f} against {self.clean_accuracy:.4f} clean on "
                f"{self.images} test images ({len(self.per_corruption())} corruptions x "
                f"{len(self.rows) // max(1, len(self.per_corruption()))} severities); worst {worst[0]} {worst[1]:.4f}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"mean_accuracy": self.mean_accuracy}


def measure(predicts: list[Callable[[np.ndarray], np.ndarray]], images: np.ndarray, labels: np.ndarray,
            corruptions: list[str], severities: list[int], seed: int = 0) -> list[Robustness]:  # fmt: skip
    """Top-1 of each of ``predicts`` (uint8 images -> logits) on clean and corrupted ``images``, one Robustness
    each (each corrupted batch made once for all: two models compared on the same images)."""

    def right(x: np.ndarray) -> list[float]:
        return [float(np.mean(p(x).argmax(1) == labels)) for p in predicts]

    clean, rows = right(images), [[] for _ in predicts]
    for c, corruption in enumerate(corruptions):
        for severity in severities:
            corrupted = corrupt_images(images, corruption, severity, seed + 100 * c + severity)
            for row, accuracy in zip(rows, right(corrupted), strict=True):
                row.append({"corruption": corruption, "severity": severity, "accuracy": accuracy})
    return [Robustness(len(labels), a, r) for a, r in zip(clean, rows, strict=True)]


def plot(result: Robustness, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vit_pipeline.evaluate import _save_fig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result.per_corruption():
        rows = [r for r in result.rows if r["corruption"] == name]
        ax.plot([r["severity"] for r in rows], [r["accuracy"] for r in rows], "o-", label=name)
    ax.axhline(result.clean_accuracy, color="k", linestyle="--", label="clean")
    ax.set_xlabel("severity")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"Accuracy under corruptions ({result.images} test images)")
    ax.set_ylim(0, max(0.05, 1.1 * result.clean_accuracy))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_fig(fig, path)


def plot_examples(
    image: np.ndarray, corruptions: list[str], severities: list[int], seed: int, path: Path
) -> Path:
    """One test image under every corruption and severity (what the model was shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vit_pipeline.evaluate import _save_fig

    fig, axes = plt.subplots(len(corruptions), len(severities) + 1, squeeze=False,
                             figsize=(1.3 * (len(severities) + 1), 1.4 * len(corruptions)))  # fmt: skip
    for c, corruption in enumerate(corruptions):
        axes[c, 0].imshow(image)
        axes[c, 0].set_ylabel(corruption, fontsize=7)
        for j, severity in enumerate(severities, 1):
            axes[c, j].imshow(corrupt_images(image[None], corruption, severity, seed + 100 * c + severity)[0])
            if c == 0:
                axes[c, j].set_title(f"severity {severity}", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save_fig(fig, path)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------- the stage
def run(ctx: StageContext, data_path: str, model_path: str) -> Robustness:
    """Corrupts the first ``robustness_images`` test images, measures the model, logs table and plots."""
    from vit_pipeline.data import Splits
    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.model import load_model

    cfg = ctx.cfg
    splits = Splits.load(data_path)
    model = load_model(model_path)
    n = min(cfg.robustness_images, len(splits.y_test))
    images, labels = np.asarray(splits.x_test[:n]), splits.y_test[:n]
    corruptions = cfg.corruption_list
    severities = list(cfg.corruption_severities)
    (result,) = measure(
        [lambda x: predict_logits(model, x)], images, labels, corruptions, severities, cfg.seed
    )
    out = ctx.work_dir / "robustness"
    result.artifacts["table"] = str(write_text(out / "robustness.csv", _csv(result.rows)))
    result.artifacts["plot"] = str(plot(result, out / "robustness.png"))
    result.artifacts["examples"] = str(plot_examples(images[0], corruptions, severities, cfg.seed,
                                                     out / "corrupted_examples.png"))  # fmt: skip
    ctx.log.metrics(result.metrics())
    ctx.log.artifacts(result.artifacts.values(), "robustness")
    ctx.log.table(result.rows, "robustness/robustness_table.json")
    ctx.log.tags({"gate.robustness": result.outcome})
    return result
