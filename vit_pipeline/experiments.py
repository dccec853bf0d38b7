"""Comparing finished runs: the table and curves of a recipe experiment.

Reads everything back from MLflow (the same numbers the UI compares), so a
report can be rebuilt at any time from the tracking store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline.fsutil import atomic_path, write_text

CURVES = (("val_accuracy", "validation top-1"), ("val_top5_accuracy", "validation top-5"),
          ("loss", "training loss"), ("learning_rate", "learning rate"))  # fmt: skip


@dataclass
class RunRow:
    """One run of the comparison table."""

    run_id: str
    preset: str
    num_params: int
    epochs: int
    train_minutes: float
    best_val_accuracy: float
    test_accuracy: float
    test_top5_accuracy: float
    parity_max_abs_diff: float
    onnx_size_mb: float


def _row(run) -> RunRow:
    m, p = run.data.metrics, run.data.params
    return RunRow(
        run_id=run.info.run_id,
        # The run name labels a variant (e.g. an ablation of a preset); else the preset.
        preset=run.info.run_name or p.get("preset", "?"),
        num_params=int(p.get("num_params", 0)),
        epochs=int(p["epochs"]),
        train_minutes=m.get("train_seconds", float("nan")) / 60,
        best_val_accuracy=m.get("best_val_accuracy", float("nan")),
        test_accuracy=m.get("test_accuracy", float("nan")),
        test_top5_accuracy=m.get("test_top5_accuracy", float("nan")),
        parity_max_abs_diff=m.get("parity_max_abs_diff", float("nan")),
        onnx_size_mb=m.get("onnx_size_mb", float("nan")),
    )


def table_markdown(rows: list[RunRow]) -> str:
    """The comparison as a markdown table (accuracies in %)."""
    lines = [
        "| preset | params | epochs | train time (min) | best val top-1 | test top-1 | test top-5 "
        "| ONNX parity max abs diff | ONNX size (MB) | MLflow run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.preset}` | {r.num_params:,} | {r.epochs} | {r.train_minutes:.1f} "
            f"| {100 * r.best_val_accuracy:.2f}% | {100 * r.test_accuracy:.2f}% "
            f"| {100 * r.test_top5_accuracy:.2f}% | {r.parity_max_abs_diff:.1e} | {r.onnx_size_mb:.1f} "
            f"| `{r.run_id}` |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One panel per curve in ``CURVES``, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for label, hist in histories.items():
            values = hist.get(key, [])
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def compare_runs(client, run_ids: list[str], out_dir: str | Path) -> dict[str, Any]:
    """Writes ``table.md``, ``curves.png`` and ``runs.json`` for the given runs.

    Args:
        client: An ``mlflow.MlflowClient`` on the store that holds the runs.
        run_ids: Runs to compare, in table order.
        out_dir: Folder for the report files.

    Returns:
        The rows (as dicts) and the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, histories = [], {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        row = _row(run)
        rows.append(row)
        histories[row.preset] = {
            key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key, _ in CURVES
        }
    table = write_text(out / "table.md", table_markdown(rows))
    curves = plot_curves(histories, out / "curves.png")
    runs = write_text(
        out / "runs.json", json.dumps({"rows": [asdict(r) for r in rows], "curves": histories}, indent=1)
    )
    return {"rows": [asdict(r) for r in rows], "table": str(table), "curves": str(curves), "runs": str(runs)}


# ------------------------------------------------------------------ transfer and time-to-accuracy
TIME_MARKS_MINUTES = (5, 10, 30)


@dataclass
class TransferRow:
    """One run of the transfer experiment."""

    label: str
    run_id: str
    init_from: str
    epochs: int
    train_images: int
    first_epoch_seconds: float
    median_epoch_seconds: float  # epochs 2 onwards: without the first epoch's graph tracing
    train_minutes: float
    test_accuracy: float
    test_top5_accuracy: float
    reached: dict[str, float | None]  # minutes -> best validation top-1 reached by then (None: ran shorter)


def top1_by_minutes(epoch_seconds: list[float], val_accuracy: list[float], marks=TIME_MARKS_MINUTES):
    """Best validation top-1 reached within each mark (minutes of training, validation included).

    A mark past the run's end is None: the run did not train that long, so it says nothing there.
    """
    elapsed = np.cumsum(epoch_seconds) / 60 if epoch_seconds else np.array([])
    out: dict[str, float | None] = {}
    for mark in marks:
        if not len(elapsed) or elapsed[-1] < mark:
            out[str(mark)] = None
            continue
        done = [acc for t, acc in zip(elapsed, val_accuracy, strict=False) if t <= mark]
        out[str(mark)] = max(done) if done else 0.0
    return out


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def transfer_row(client, label: str, run_id: str) -> TransferRow:
    run = client.get_run(run_id)
    m, p = run.data.metrics, run.data.params
    seconds = _history(client, run_id, "epoch_seconds")
    val = _history(client, run_id, "val_accuracy")
    return TransferRow(
        label=label,
        run_id=run_id,
        init_from=p.get("init_from", "None"),
        epochs=int(p["epochs"]),
        train_images=int(p.get("data.train_size", 0)),
        first_epoch_seconds=seconds[0] if seconds else float("nan"),
        median_epoch_seconds=float(np.median(seconds[1:])) if len(seconds) > 1 else float("nan"),
        train_minutes=m.get("train_seconds", float("nan")) / 60,
        test_accuracy=m.get("test_accuracy", float("nan")),
        test_top5_accuracy=m.get("test_top5_accuracy", float("nan")),
        reached=top1_by_minutes(seconds, val),
    )


def _seconds(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.1f}"  # "-": the run logged no epoch_seconds


def _gains(rows: list[TransferRow]) -> list[str]:
    """Each fine-tuned row against the group's best from-scratch row (same budget) and its first one.

    The gain a user can count on is over the best from-scratch run of that budget, whichever preset won
    (at 30 minutes the seed preset beat the best one: docs/experiments.md); the epoch-time ratios are
    against the first from-scratch row, the pre-training recipe and so the same architecture.
    """
    scratch = [r for r in rows if r.init_from == "None"]
    if not scratch:
        return []
    same_arch = scratch[0]
    best = max(scratch, key=lambda r: r.test_accuracy)  # a tie keeps the first
    lines = []
    for r in rows:
        if r.init_from == "None":
            continue
        gain, gain_same = (100 * (r.test_accuracy - s.test_accuracy) for s in (best, same_arch))
        text = f"- {r.label} vs {best.label}: **{gain:+.2f} points** test top-1"
        if best is not same_arch:
            text += f" (the best from scratch here; {gain_same:+.2f} over {same_arch.label})"
        first = r.first_epoch_seconds / same_arch.first_epoch_seconds
        later = r.median_epoch_seconds / same_arch.median_epoch_seconds
        lines.append(
            f"{text}; epoch time against {same_arch.label} (same architecture): first epoch {first:.2f}x, "
            f"later epochs (median) {later:.2f}x."
        )
    return lines


def transfer_markdown(groups: dict[str, list[TransferRow]]) -> str:
    """Per group (a budget): the runs, the gain of each fine-tuned run over the best from-scratch run; then
    time-to-accuracy for the runs that trained past a mark."""
    lines: list[str] = []
    for group, rows in groups.items():
        lines += [
            f"### {group}",
            "",
            "| run | init_from | epochs | first epoch (s) | median later epoch (s) | train time (min) | test top-1 "
            "| test top-5 | MLflow run |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r.label} | `{r.init_from}` | {r.epochs} | {_seconds(r.first_epoch_seconds)} "
                f"| {_seconds(r.median_epoch_seconds)} | {r.train_minutes:.1f} | {100 * r.test_accuracy:.2f}% "
                f"| {100 * r.test_top5_accuracy:.2f}% | `{r.run_id}` |"
            )
        gains = _gains(rows)
        lines += ["", *gains, ""] if gains else [""]
    timed = [r for rows in groups.values() for r in rows if any(v is not None for v in r.reached.values())]
    if timed:
        marks = list(timed[0].reached)
        lines += [
            "### Time-to-accuracy",
            "",
            "Best validation top-1 reached within each budget (training and validation wall time):",
            "",
            "| run | " + " | ".join(f"{m} min" for m in marks) + " | run ended at (min) |",
            "|---|" + "---:|" * (len(marks) + 1),
        ]
        for r in timed:
            cells = [
                "not run that long" if r.reached.get(m) is None else f"{100 * r.reached[m]:.2f}%"
                for m in marks
            ]
            lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {r.train_minutes:.1f} |")
        lines.append("")
    return "\n".join(lines)


def transfer_report(client, groups: dict[str, dict[str, str]], out_dir: str | Path) -> dict[str, Any]:
    """Writes ``table.md``, ``curves.png`` and ``runs.json`` for labelled runs in groups
    (group -> label -> run id; a group is one budget, its best from-scratch run the baseline)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        g: [transfer_row(client, label, run_id) for label, run_id in runs.items()]
        for g, runs in groups.items()
    }
    histories = {
        label: {key: _history(client, run_id, key) for key, _ in CURVES}
        for runs in groups.values()
        for label, run_id in runs.items()
    }
    table = write_text(out / "table.md", transfer_markdown(rows))
    curves = plot_curves(histories, out / "curves.png")
    data = {"groups": {g: [asdict(r) for r in rs] for g, rs in rows.items()}, "curves": histories}
    runs_file = write_text(out / "runs.json", json.dumps(data, indent=1))
    flat = [asdict(r) for rs in rows.values() for r in rs]
    return {"rows": flat, "table": str(table), "curves": str(curves), "runs": str(runs_file)}
