"""Promotion thresholds, in the style of TFMA's ``MetricThreshold``: a value bound and a change bound.

The register stage judges the file that will be served (ONNX Runtime) on the new run's full
test split, and the champion's file on the same images. Each threshold is a config field:

* **Value** (the candidate alone): ``min_test_accuracy`` (top-1, 0-1),
  ``min_class_recall`` (0-1, every class with at least ``class_min_support`` test images),
  ``max_test_ece`` (the expected calibration error of the probabilities the file serves, at its
  temperature) and ``min_relative_robustness`` (the robustness stage's mean top-1 under corruption
  over its clean top-1).
* **Change** (against a comparable champion): the candidate's top-1 may be below the
  champion's by at most ``max_accuracy_drop`` points (0: "at least the champion's", the
  default rule), and no class with at least ``class_min_support`` test images may lose more
  than ``max_class_recall_drop`` points of recall. One class collapsing while the mean
  improves is exactly what a single top-1 figure hides. ``max_label_shift``: the champion's
  own recall of a class, on its test split against on this run's, must not fall by more than
  that many points with the 95% intervals apart (the class's name now holds other images).
  ``max_robustness_drop`` (off by default: it corrupts the images again and runs both files on
  them): points of mean top-1 under the robustness stage's corruptions the candidate may lose.

The comparison leaves out the test images the champion trained on (a run with another split
seed or other data draws its test images partly from the champion's training images, on
which the champion scores higher); ``registry.decide`` says how many.

Per-class figures on few images are noisy (the recall of a 20-image class moves in steps of
5 points, and between two models by about 15 points for no reason): ``class_min_support``
keeps such classes out of the per-class checks rather than letting noise block promotion.
Every check is recorded, held or not, with its figures (``registry/thresholds.json``, tag
``gate.thresholds``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vit_pipeline.config import PipelineConfig
    from vit_pipeline.robustness import Robustness


@dataclass(frozen=True)
class Check:
    """One threshold and whether it held."""

    name: str
    held: bool
    detail: str
    checked: bool = True  # False: nothing it applies to (no class with enough test images); held says nothing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_recall(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: recall of the top-1 prediction and support (NaN recall where support is 0)."""
    support = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=logits.argmax(1) == labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / support, support


def _per_class(cfg: PipelineConfig, name: str, judged: np.ndarray, support: np.ndarray, held: bool,
               detail: str) -> Check:  # fmt: skip
    """A per-class check, or one that checked nothing: no class has ``class_min_support`` test images."""
    if len(judged):
        return Check(name, held, detail)
    return Check(name, True, f"no class has >= {cfg.class_min_support} of the {int(support.sum())} test images "
                             f"judged, the most {int(support.max())}; --class-min-support sets it",
                 checked=False)  # fmt: skip


def value_checks(
    cfg: PipelineConfig,
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    temperature: float = 1.0,
    relative_robustness: float | None = None,
) -> list[Check]:
    """The candidate's own floors (none configured: no checks).

    ``temperature``: the one the served file's probabilities use (its metadata); ``relative_robustness``: the
    run's ``robustness_relative_accuracy`` (None: the robustness stage did not record one).
    """
    checks = []
    if cfg.max_test_ece is not None:
        from vit_pipeline.calibration import reliability

        ece = reliability(logits, labels, cfg.ece_bins, temperature)["ece"]
        checks.append(Check("max_test_ece", ece <= cfg.max_test_ece,
                            f"expected calibration error {ece:.4f} at temperature {temperature:.3g} "
                            f"(maximum {cfg.max_test_ece:g})"))  # fmt: skip
    if cfg.min_relative_robustness is not None:
        if relative_robustness is None:  # configured and not measured: nothing says it held
            checks.append(Check("min_relative_robustness", False, "no robustness_relative_accuracy on the run "
                                "(the robustness stage did not record one)"))  # fmt: skip
        else:
            checks.append(Check("min_relative_robustness", relative_robustness >= cfg.min_relative_robustness,
                                f"mean top-1 under corruption {relative_robustness:.4f} of the clean top-1 "
                                f"(minimum {cfg.min_relative_robustness:g})"))  # fmt: skip
    top1 = float(np.mean(logits.argmax(1) == labels))
    if cfg.min_test_accuracy is not None:
        checks.append(Check("min_test_accuracy", top1 >= cfg.min_test_accuracy,
                            f"top-1 {top1:.4f} (minimum {cfg.min_test_accuracy:.4f})"))  # fmt: skip
    if cfg.min_class_recall is not None:
        recall, support = class_recall(logits, labels, len(class_names))
        judged = np.flatnonzero(support >= cfg.class_min_support)
        under = [i for i in judged if recall[i] < cfg.min_class_recall]
        shown = ", ".join(f"{class_names[i]!r} {recall[i]:.2f}" for i in under[:5])
        checks.append(_per_class(cfg, "min_class_recall", judged, support, not under,
                                 f"{len(under)} of {len(judged)} classes with >= {cfg.class_min_support} test images "
                                 f"under recall {cfg.min_class_recall:.2f}{': ' + shown if under else ''}"))  # fmt: skip
    return checks


def change_checks(cfg: PipelineConfig, logits: np.ndarray, champion_logits: np.ndarray, labels: np.ndarray,
                  class_names: list[str]) -> list[Check]:  # fmt: skip
    """The candidate against the champion on the same images."""
    new = float(np.mean(logits.argmax(1) == labels))
    old = float(np.mean(champion_logits.argmax(1) == labels))
    drop = 100 * (old - new)
    checks = [Check("max_accuracy_drop", drop <= cfg.max_accuracy_drop + 1e-9,
                    f"top-1 {new:.4f} vs champion's {old:.4f}: {max(drop, 0):.2f} points lower "
                    f"(at most {cfg.max_accuracy_drop:g})")]  # fmt: skip
    if cfg.max_class_recall_drop is not None:
        n = len(class_names)
        (r_new, support), (r_old, _) = (
            class_recall(logits, labels, n),
            class_recall(champion_logits, labels, n),
        )
        judged = np.flatnonzero(support >= cfg.class_min_support)
        drops = 100 * (r_old - r_new)
        worse = sorted((i for i in judged if drops[i] > cfg.max_class_recall_drop), key=lambda i: -drops[i])
        shown = ", ".join(f"{class_names[i]!r} {r_old[i]:.2f} -> {r_new[i]:.2f}" for i in worse[:5])
        checks.append(_per_class(cfg, "max_class_recall_drop", judged, support, not worse,
                                 f"{len(worse)} of {len(judged)} classes with >= {cfg.class_min_support} test images "
                                 f"lost more than {cfg.max_class_recall_drop:g} points of recall"
                                 f"{': ' + shown if worse else ''}"))  # fmt: skip
    return checks


def paired_difference(new_right: np.ndarray, old_right: np.ndarray) -> str:
    """Two models on the same images: how many only one got right, and the exact McNemar test's p-value (scipy's
    binomial test on those images): a small gap on a small split reads as chance, said so beside the figures."""
    from scipy.stats import binomtest

    only_new = int(np.sum(new_right & ~old_right))
    only_old = int(np.sum(old_right & ~new_right))
    if not only_new + only_old:
        return "both right on exactly the same images"
    p = binomtest(min(only_new, only_old), only_new + only_old, 0.5).pvalue
    chance = "; within chance" if p >= 0.05 else ""
    return f"{only_new} images only it got right, {only_old} only the champion (McNemar p={p:.2g}{chance})"


def wilson(hits: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of ``hits`` successes in ``n`` (scipy)."""
    from scipy.stats import binomtest

    ci = binomtest(int(round(hits)), int(n)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def label_shift_check(cfg: PipelineConfig, champion_logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                      own_recall: dict[str, tuple[float, int]],
                      parts: list[tuple[str, np.ndarray]] | None = None) -> Check:  # fmt: skip
    """The champion's recall per class here against on its own test split (``own_recall``: name -> (recall,
    support)). A class it recognised there and misses here, by more than ``max_label_shift`` points and with the
    95% intervals apart, holds other images under its name: a candidate trained on them wins the comparison by
    construction (two swapped classes: the champion at 0, the candidate at its usual figure).

    ``parts``: (what they are, indices) of the test images, each judged on its own (the images the champion
    trained on and the others: relabelled images it trained on, or new images filed under a class, would each be
    diluted by the other part); default one part, every image."""
    shifted = []
    for part, idx in parts or [("", np.arange(len(labels)))]:
        if not len(idx):
            continue
        recall, support = class_recall(champion_logits[idx], labels[idx], len(class_names))
        for i, name in enumerate(class_names):
            if name not in own_recall or not support[i] or not own_recall[name][1]:
                continue
            before, n_before = own_recall[name]
            drop = 100 * (before - recall[i])
            apart = wilson(recall[i] * support[i], support[i])[1] < wilson(before * n_before, n_before)[0]
            if drop > cfg.max_label_shift and apart:
                where = f" on {support[i]} {part}" if part else ""
                shifted.append((drop, name, f"{name!r} {before:.2f} -> {recall[i]:.2f}{where}"))
    classes = {name for _, name, _ in shifted}
    shown = ", ".join(text for *_, text in sorted(shifted, reverse=True)[:5])
    return Check("max_label_shift", not shifted,
                 f"{len(classes)} of {len(class_names)} classes the champion recognised on its own test split and "
                 f"misses on this one (more than {cfg.max_label_shift:g} points, 95% intervals apart)"
                 f"{': ' + shown + ': relabelled or re-sorted data? a new --dataset-name keeps them apart' if shifted else ''}")  # fmt: skip


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.held]


def change_names(cfg: PipelineConfig) -> list[str]:
    """The change thresholds configured: checked only against a champion (``change_checks``)."""
    return [
        "max_accuracy_drop",
        *(["max_class_recall_drop"] if cfg.max_class_recall_drop is not None else []),
        *(["max_label_shift"] if cfg.max_label_shift is not None else []),
        *(["max_robustness_drop"] if cfg.max_robustness_drop is not None else []),
    ]


def robustness_change_check(cfg: PipelineConfig, new: Robustness, old: Robustness) -> Check:
    """The candidate's mean top-1 under corruption against the champion's, on the same corrupted images: a
    recipe that gains clean accuracy and loses the noisy, blurred or dark images apps also send."""
    drop = 100 * (old.mean_accuracy - new.mean_accuracy)
    return Check("max_robustness_drop", drop <= cfg.max_robustness_drop + 1e-9,
                 f"mean top-1 under corruption {new.mean_accuracy:.4f} vs champion's {old.mean_accuracy:.4f} on "
                 f"{new.images} test images x {len(new.rows)} corruptions and severities: "
                 f"{max(drop, 0):.2f} points lower (at most {cfg.max_robustness_drop:g})")  # fmt: skip


def outcome(checks: list[Check], unchecked: str = "") -> str:
    """``held: ...`` or ``failed: ...`` (the run and version tag), and the thresholds not checked and why
    (``unchecked``): a change threshold without a champion to compare with is not "none configured"."""
    bad = failed(checks)
    idle = [c for c in checks if not c.checked]
    if idle:  # configured, but no class had the test images to judge it: not "held"
        unchecked = "; ".join(
            [*([unchecked] if unchecked else []), *(f"{c.name} not checked ({c.detail})" for c in idle)]
        )
        checks = [c for c in checks if c.checked]
    if bad:
        held = [c.name for c in checks if c.held]
        text = (
            "failed: "
            + "; ".join(f"{c.name} ({c.detail})" for c in bad)
            + (f"; held: {', '.join(held)}" if held else "")
        )
    elif checks:
        text = "held: " + ", ".join(c.name for c in checks)
    else:
        text = "none checked" if unchecked else "none configured"
    return f"{text}; {unchecked}" if unchecked else text
