"""The calibration stage (after evaluation, before export): ECE, reliability diagram, temperature.

A classifier's softmax outputs are "probabilities" only if, among the answers given with
confidence 0.8, about 80% are right. ViTs trained with these recipes are not: label
smoothing and heavy regularisation make them under-confident, long training on few images
over-confident. This stage measures it and fixes what one scalar can fix:

* **Expected calibration error** (Guo et al. 2017, "On Calibration of Modern Neural
  Networks"): the test images binned by top-1 confidence into ``ece_bins`` equal-width
  bins; the support-weighted mean gap between each bin's accuracy and its mean confidence.
  A reliability diagram plots the bins, before and after.
* **Temperature scaling** (same paper): one ``T > 0`` that minimises the negative
  log-likelihood of ``softmax(logits / T)`` on the *validation* split
  (``scipy.optimize.minimize_scalar`` over ``log T``), served only where it generalises within
  that split (``checked_temperature``: two folds), else ``T = 1`` with the reason. It divides every logit alike, so the
  ranking, top-1 and top-5 are unchanged; the ONNX graph is unchanged (parity holds) and
  ``T`` travels in the file's metadata (``vit_consumer.contract.META_TEMPERATURE``), which the
  consumer and ``vit-pipeline predict`` apply to the probabilities they return.

Outcome: metrics ``test_ece``, ``test_ece_calibrated``, ``test_nll``, ``test_nll_calibrated``,
``temperature``; run tag ``gate.calibration``; artifacts under ``calibration/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline.fsutil import write_text

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]: wider means a broken model, not a calibration


def reliability(
    logits: np.ndarray, labels: np.ndarray, bins: int, temperature: float = 1.0
) -> dict[str, Any]:
    """Per confidence bin: support, accuracy, mean confidence; and the ECE they give."""
    from vit_consumer.contract import softmax

    probs = softmax(logits, temperature)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    support = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(support, 1)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(support, 1)
    ece = float(np.sum(support / max(1, len(labels)) * np.abs(acc - conf)))
    return {"ece": ece, "edges": edges.tolist(), "support": support.tolist(), "accuracy": acc.tolist(),
            "confidence": conf.tolist()}  # fmt: skip


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising ``nll(logits, labels, T)`` (bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                            method="bounded", options={"xatol": 1e-4})  # fmt: skip
    return float(np.exp(found.x))


def checked_temperature(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, str]:
    """The temperature to serve, and why: ``fit_temperature`` on the whole validation split, kept only if it
    generalises within it.

    Two folds of the validation split (seeded halves): a temperature fitted on one half must lower the other
    half's NLL, summed over both ways. A fit that does not (a split with one or two errors, whose NLL a
    sharper softmax always lowers: the quickstart's 144 images with one error gave T = 0.43 and worse test
    ECE and NLL) is not served; T = 1 is, and the reason says so. The test split plays no part.
    """
    t = fit_temperature(logits, labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    if min(len(h) for h in halves) < 2:
        return 1.0, f"kept T = 1: {len(labels)} validation images are too few to check a fitted temperature"
    gain = 0.0
    for fit, held in (halves, halves[::-1]):
        t_half = fit_temperature(logits[fit], labels[fit])
        gain += nll(logits[held], labels[held]) - nll(logits[held], labels[held], t_half)
    if gain <= 0:
        return 1.0, (f"kept T = 1: the fitted {t:.3f} did not generalise within the validation split (fitted on "
                     f"one half, the other half's NLL rose by {-gain / 2:.4f} on average)")  # fmt: skip
    return t, f"fitted on the validation split (held-out NLL of its halves {gain / 2:.4f} lower)"


@dataclass
class Calibration:
    """Temperature and the test split's calibration before and after it."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    val_images: int
    test_images: int
    bins: int
    why: str = "fitted on the validation split"
    artifacts: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {"temperature": self.temperature, "test_ece": self.ece_before, "test_ece_calibrated": self.ece_after,
                "test_nll": self.nll_before, "test_nll_calibrated": self.nll_after}  # fmt: skip

    @property
    def outcome(self) -> str:
        return (f"temperature {self.temperature:.3f} ({self.why}; {self.val_images} validation images): test ECE "
                f"{self.ece_before:.4f} -> {self.ece_after:.4f}, NLL {self.nll_before:.4f} -> {self.nll_after:.4f}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray,
              bins: int = 15) -> tuple[Calibration, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Fits T on validation (``checked_temperature``); returns the result and the test reliability tables
    before and after."""
    t, why = checked_temperature(val_logits, val_labels)
    before = reliability(test_logits, test_labels, bins)
    after = reliability(test_logits, test_labels, bins, t)
    result = Calibration(t, before["ece"], after["ece"], nll(test_logits, test_labels),
                         nll(test_logits, test_labels, t), len(val_labels), len(test_labels), bins, why)  # fmt: skip
    return result, before, after


def plot_reliability(before: dict[str, Any], after: dict[str, Any], temperature: float, path: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vit_pipeline.evaluate import _save_fig

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, table, title in ((axes[0], before, "softmax(logits)"),
                             (axes[1], after, f"softmax(logits / {temperature:.2f})")):  # fmt: skip
        edges = np.asarray(table["edges"])
        width = edges[1] - edges[0]
        has = np.asarray(table["support"]) > 0
        ax.bar(edges[:-1][has], np.asarray(table["accuracy"])[has], width=width, align="edge", alpha=0.7,
               edgecolor="k", label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.plot(
            np.asarray(table["confidence"])[has], np.asarray(table["accuracy"])[has], "r.", label="bin mean"
        )
        ax.set_title(f"{title}: ECE {table['ece']:.4f}")
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return _save_fig(fig, path)


# ------------------------------------------------------------------- the stage
def run(ctx: StageContext, data_path: str, model_path: str) -> Calibration:
    """Fits the temperature on validation logits, measures the test split, logs all of it."""
    from vit_pipeline.data import Splits
    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.model import load_model

    splits = Splits.load(data_path)
    model = load_model(model_path)
    val_logits = predict_logits(model, splits.x_val)
    test_logits = predict_logits(model, splits.x_test)
    result, before, after = calibrate(val_logits, splits.y_val, test_logits, splits.y_test, ctx.cfg.ece_bins)
    out = ctx.work_dir / "calibration"
    result.artifacts["reliability_diagram"] = str(plot_reliability(before, after, result.temperature,
                                                                   out / "reliability_diagram.png"))  # fmt: skip
    tables = {"result": result.to_dict(), "test_before": before, "test_after": after}
    result.artifacts["calibration"] = str(write_text(out / "calibration.json", json.dumps(tables, indent=1)))
    ctx.log.metrics(result.metrics())
    ctx.log.artifacts(result.artifacts.values(), "calibration")
    ctx.log.tags({"gate.calibration": result.outcome, "calibration.why": result.why})
    return result
