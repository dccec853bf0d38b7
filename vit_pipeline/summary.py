"""Human-readable run summaries (Prefect markdown artifact) and UI links."""

from __future__ import annotations

import os
from typing import Any

from vit_pipeline.config import PipelineConfig


def prefect_run_url(flow_run_id: str, ui_url: str | None = None) -> str:
    """The flow run's page in the Prefect UI.

    Prefect knows the UI URL when ``PREFECT_UI_URL`` or a server API URL is set;
    with the ephemeral server it does not, and the run is shown by
    ``prefect server start`` on its default address (same local database).
    """
    if ui_url and ui_url.startswith(("http://", "https://")):  # Prefect writes "None/..." without a UI URL
        return ui_url
    base = os.environ.get("PREFECT_UI_URL") or "http://127.0.0.1:4200"
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}"


def run_markdown(
    cfg: PipelineConfig, preset: str, result: dict[str, Any], data_summary: dict[str, Any]
) -> str:
    """Markdown table of the run's headline numbers with a link to MLflow."""
    rows = [
        ("MLflow run", f"[{result['mlflow_run_id']}]({result['mlflow_run_url']})"),
        ("preset", preset),
        (
            "dataset",
            f"{cfg.dataset_tag} ({data_summary['train_size']} train / "
            f"{data_summary['val_size']} val / {data_summary['test_size']} test)",
        ),  # fmt: skip
        ("test top-1", f"{result['test_accuracy']:.4f}"),
        ("test top-5", f"{result['test_top5_accuracy']:.4f}"),
        ("best val top-1", f"{result['best_val_accuracy']:.4f}"),
        ("epochs", str(cfg.epochs)),
        ("training time", f"{result['train_seconds']:.1f} s"),
    ]
    if "parity" in result:
        p = result["parity"]
        rows.append(("ONNX parity", f"max abs diff {p['max_abs_diff']:.2g}, top-1 agreement "
                                    f"{p['top1_agreement']:.2%} on {p['num_images']} images"))  # fmt: skip
    if "registry" in result:
        r = result["registry"]
        decision = "`champion`" if r["outcome"] == "champion" else r["outcome"]
        rows.append(("registry", f"`{r['model_uri']}` {decision} ({r['reason']})"))
    if result.get("benchmark"):
        rows.append(("inference speed", "<br>".join(result["benchmark"])))
    lines = ["# ViT training run", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"
