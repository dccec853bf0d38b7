"""Pipeline stages with their MLflow logging, shared by the Prefect flow and the CLI.

Each stage takes the config as a dict, the MLflow run id and paths, and returns a
small JSON-able dict (paths and metrics): Prefect tasks pass these, not models.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline import config as config_mod
from vit_pipeline import data, tracking
from vit_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


def _cfg(cfg: PipelineConfig | dict[str, Any]) -> PipelineConfig:
    return cfg if isinstance(cfg, PipelineConfig) else config_mod.from_dict(cfg)


def fetch_stage(cfg: PipelineConfig | dict[str, Any]) -> str | None:
    """Makes sure the raw data is local; returns its path (None: built in)."""
    cfg = _cfg(cfg)
    if cfg.dataset == "cifar100" and not cfg.data_path:
        return str(data.fetch_cifar100())
    return cfg.data_path


def prepare_stage(cfg: PipelineConfig | dict[str, Any], run_id: str, source_path: str | None = None) -> dict:
    """Loads, splits and validates the data; saves it; logs the dataset to MLflow."""
    import mlflow

    cfg = _cfg(cfg)
    splits = data.prepare(cfg, source_path)
    path = splits.save(tracking.work_dir(run_id) / "data.npz")
    summary = splits.summary()
    with tracking.open_run(cfg, run_id):
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                splits.x_train[:64], targets=splits.y_train[:64], source=summary["source"],
                name=cfg.dataset_tag, digest=summary["digest"][:16],
            )  # fmt: skip
        mlflow.log_input(dataset, context="training")
        mlflow.log_params(
            {
                "data.source": summary["source"],
                "data.num_classes": summary["num_classes"],
                "data.train_size": summary["train_size"],
                "data.val_size": summary["val_size"],
                "data.test_size": summary["test_size"],
                "data.digest": summary["digest"],
                **({"data.skipped_files": summary["skipped_files"]} if "skipped_files" in summary else {}),
            }
        )
        mlflow.log_dict({"class_names": splits.class_names, **summary}, "data/dataset.json")
    log.info("Prepared %s: %s", cfg.dataset_tag, summary)
    return {"data_path": str(path), "summary": summary, "class_names": splits.class_names}


def train_stage(cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str) -> dict:
    """Trains; logs per-epoch metrics, the best epoch and the Keras model (with signature)."""
    import keras
    import mlflow

    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.model import load_model
    from vit_pipeline.train import train

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    result = train(cfg, splits, tracking.work_dir(run_id), run_id=run_id)
    with tracking.open_run(cfg, run_id):
        mlflow.log_metrics(
            {
                "best_val_accuracy": result.best_val_accuracy,
                "best_epoch": result.best_epoch + 1,
                "train_seconds": result.train_seconds,
                "train_images_per_second": len(splits.y_train) * result.epochs_run / result.train_seconds,
            }
        )
        mlflow.log_param("num_params", result.num_params)
        mlflow.log_artifact(result.history_path, "training")
        model = load_model(result.model_path)
        example = splits.x_test[:2].astype(np.float32)
        signature = mlflow.models.infer_signature(example, predict_logits(model, example))
        import tensorflow as tf

        mlflow.keras.log_model(
            model,
            name="keras-model",
            signature=signature,
            # Listing requirements skips MLflow's slow inference (it reloads the model).
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
        )
    return result.to_dict()


def evaluate_stage(
    cfg: PipelineConfig | dict[str, Any],
    run_id: str,
    data_path: str,
    model_path: str,
    history_path: str | None,
) -> dict:
    """Test metrics, per-class CSV, confusion matrix, learning curves, patch picture."""
    import json

    import mlflow

    from vit_pipeline.evaluate import evaluate
    from vit_pipeline.model import load_model

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    model = load_model(model_path)
    history = json.loads(Path(history_path).read_text()) if history_path else None
    out = tracking.work_dir(run_id) / "evaluation"
    result = evaluate(
        model, splits.x_test, splits.y_test, splits.class_names, out,
        history=history, image_size=cfg.image_size, patch_size=cfg.patch_size,
    )  # fmt: skip
    with tracking.open_run(cfg, run_id):
        mlflow.log_metrics(result.metrics())
        for path in result.artifacts.values():
            mlflow.log_artifact(path, "evaluation")
    return result.to_dict()


def export_stage(
    cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str, model_path: str, test_accuracy: float
) -> dict:
    """Exports to ONNX and runs the parity gate; raises ExportError if it fails.

    The parity figures are logged before the gate decides, so a failure is
    visible in MLflow; the ONNX file is logged (and registered) only afterwards.
    """
    import mlflow

    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.export import build_metadata, check_parity, export_onnx, parity_gate
    from vit_pipeline.model import load_model

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    model = load_model(model_path)
    metadata = build_metadata(
        splits.class_names, splits.input_shape, dataset=cfg.dataset_tag, test_accuracy=test_accuracy,
        run_id=run_id, extra={"data_digest": splits.digest(), "image_size": cfg.image_size,
                              "patch_size": cfg.patch_size, "opset": cfg.onnx_opset},
    )  # fmt: skip
    info = export_onnx(model, tracking.work_dir(run_id) / "model.onnx", metadata, cfg.onnx_opset)
    images = splits.x_test[: cfg.parity_images]
    report = check_parity(predict_logits(model, images), info["path"], images, (1, 64), cfg.parity_tolerance)
    with tracking.open_run(cfg, run_id):
        mlflow.log_metrics(
            {
                "export_seconds": info["export_seconds"],
                "onnx_size_mb": info["size_bytes"] / 2**20,
                "parity_max_abs_diff": report.max_abs_diff,
                "parity_top1_agreement": report.top1_agreement,
            }
        )
        mlflow.log_dict({**report.to_dict(), "ops": info["ops"]}, "export/parity.json")
        mlflow.set_tag("export.parity", "passed" if report.passed else "failed")
    parity_gate(report)
    return {**info, "parity": report.to_dict()}


def register_stage(
    cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str, onnx_path: str, test_accuracy: float
) -> dict:
    """Logs the ONNX model to MLflow, registers it and applies the champion policy."""
    from vit_pipeline.registry import register_onnx

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    reg = register_onnx(cfg, run_id, onnx_path, splits.x_test[:1], test_accuracy, splits.digest())
    return reg.to_dict()
