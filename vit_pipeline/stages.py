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
from vit_pipeline import data, runs, tracking
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
    path = tracking.work_dir(run_id) / "data.npz"
    if path.exists():  # a resumed run keeps the split it started with (and its logged input)
        splits = data.Splits.load(path)
        log.info("Reusing prepared data %s", path)
        return {"data_path": str(path), "summary": splits.summary(), "class_names": splits.class_names}
    splits = data.prepare(cfg, source_path, shard_dir=path.parent / "shards")
    path = splits.save(path)
    summary = splits.summary()
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_numpy(
            splits.x_train[:64], targets=splits.y_train[:64], source=summary["source"],
            name=cfg.dataset_tag, digest=summary["digest"][:16],
        )  # fmt: skip
    from mlflow.entities import DatasetInput, InputTag

    context = InputTag(key="mlflow.data.context", value="training")
    tracking.client(cfg).log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[context])]
    )
    tracking.log_params(
        cfg,
        run_id,
        {
            "data.source": summary["source"],
            "data.num_classes": summary["num_classes"],
            "data.train_size": summary["train_size"],
            "data.val_size": summary["val_size"],
            "data.test_size": summary["test_size"],
            "data.digest": summary["digest"],
            **({"data.skipped_files": summary["skipped_files"]} if "skipped_files" in summary else {}),
        },
    )
    tracking.client(cfg).log_dict(run_id, {"class_names": splits.class_names, **summary}, "data/dataset.json")
    log.info("Prepared %s: %s", cfg.dataset_tag, summary)
    return {"data_path": str(path), "summary": summary, "class_names": splits.class_names}


KERAS_MODEL_TAG = "train.keras_model_uri"


def train_stage(cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str) -> dict:
    """Trains; logs per-epoch metrics, the best epoch and the Keras model (with signature)."""
    import mlflow

    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.model import load_model
    from vit_pipeline.train import train

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    out = tracking.work_dir(run_id)
    result = train(cfg, splits, out, run_id=run_id)
    _sync_or_fail(cfg, run_id, out, result.model_path)
    tracking.log_metrics(
        cfg,
        run_id,
        {
            "best_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch + 1,
            "train_seconds": result.train_seconds,
            "train_images_per_second": len(splits.y_train)
            * (result.epochs_run - result.resumed_from_epoch)
            / max(result.train_seconds, 1e-9),
            "resumed_from_epoch": result.resumed_from_epoch,
            # Metrics, not params: a resumed run may train on another device count.
            "num_replicas": result.num_replicas,
            "global_batch_size": result.global_batch_size,
        },
    )
    tracking.set_tags(
        cfg, run_id, {"train.distribution": f"{cfg.distribution_strategy} x{result.num_replicas}"}
    )
    tracking.log_params(cfg, run_id, {"num_params": result.num_params})
    tracking.log_artifacts(cfg, run_id, [result.history_path], "training")
    if KERAS_MODEL_TAG not in tracking.client(cfg).get_run(run_id).data.tags:  # a resume logs it once
        model = load_model(result.model_path)
        example = splits.x_test[:2].astype(np.float32)
        signature = mlflow.models.infer_signature(example, predict_logits(model, example))
        from vit_pipeline.mlflow_models import log_keras_model

        info = log_keras_model(cfg, run_id, model, signature)
        tracking.set_tags(cfg, run_id, {KERAS_MODEL_TAG: info.model_uri})
    return result.to_dict()


def _sync_or_fail(cfg: PipelineConfig, run_id: str, out: Path, model_path: str) -> None:
    """Sends epochs MLflow missed while it was away; fails clearly if it is still away."""
    from vit_pipeline.errors import TrackingUnavailable
    from vit_pipeline.train import EpochLog

    epochs = EpochLog(out / "epochs.jsonl").read()
    try:
        tracking.check_reachable(cfg)
        sent = tracking.sync_epochs(cfg, run_id, epochs)
    except Exception as exc:
        raise TrackingUnavailable(
            f"Training finished (model: {model_path}; per-epoch metrics: {out / 'epochs.jsonl'}) but MLflow at "
            f"{tracking.tracking_uri(cfg)} is unreachable; rerun with --resume {run_id} to upload without training again"
        ) from exc
    if sent:
        log.warning("Sent epochs %s to MLflow after it was away", sent)


def evaluate_stage(
    cfg: PipelineConfig | dict[str, Any],
    run_id: str,
    data_path: str,
    model_path: str,
    history_path: str | None,
) -> dict:
    """Test metrics, per-class CSV, confusion matrix, learning curves, patch picture."""
    import json

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
    tracking.log_metrics(cfg, run_id, result.metrics())
    tracking.log_artifacts(cfg, run_id, result.artifacts.values(), "evaluation")
    _log_per_class_table(cfg, run_id, result.per_class)
    return result.to_dict()


def _log_per_class_table(cfg: PipelineConfig, run_id: str, rows: list[dict[str, Any]]) -> None:
    """The per-class CSV's rows as an MLflow table too (the run page's artifact view shows it as a grid)."""
    import pandas as pd

    tracking.client(cfg).log_table(run_id, pd.DataFrame(rows), "evaluation/per_class_metrics.json")


def export_stage(
    cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str, model_path: str, test_accuracy: float
) -> dict:
    """Exports to ONNX, builds the serving candidates once, and gates them all.

    The plain export and the served file (the fused graph by default) must pass
    the strict parity gate; the parity figures are logged before the gate
    decides, so a failure is visible in MLflow. Each other serving candidate
    (``serve_candidates``, e.g. int8-static) must keep ``candidate_min_agreement``
    top-1 agreement with Keras on real test images, or it is dropped (with its
    figures logged). The ONNX files are registered only afterwards, by
    ``register_stage``. Raises ExportError when a strict gate fails.
    """
    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.export import build_metadata, check_parity, export_onnx, parity_gate
    from vit_pipeline.model import load_model
    from vit_pipeline.variants import build_variants, calibration_sample

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    model = load_model(model_path)
    metadata = build_metadata(
        splits.class_names, splits.input_shape, dataset=cfg.dataset_tag, test_accuracy=test_accuracy,
        run_id=run_id, extra={"data_digest": splits.digest(), "image_size": cfg.image_size,
                              "patch_size": cfg.patch_size, "opset": cfg.onnx_opset},
    )  # fmt: skip
    out = tracking.work_dir(run_id)
    info = export_onnx(model, out / "model.onnx", metadata, cfg.onnx_opset)
    candidates = [v for v in cfg.serve_candidate_list if v != cfg.serve_variant]
    calibration = calibration_sample(splits.x_train, cfg.int8_calibration_images, cfg.seed)
    fusions: dict[str, int] = {}
    paths = {k: str(v) for k, v in build_variants(
        info["path"], out, ["fp32", cfg.serve_variant, *candidates], calibration=calibration,
        fusions=fusions).items()}  # fmt: skip
    # Keras logits once, for the parity images and the (larger) candidate gate alike.
    all_logits = predict_logits(
        model, splits.x_test[: max(cfg.parity_images, cfg.candidate_images if candidates else 0)]
    )
    images = splits.x_test[: cfg.parity_images]
    keras_logits = all_logits[: len(images)]
    strict = {name: paths[name] for name in ("fp32", cfg.serve_variant)}
    reports = {name: check_parity(keras_logits, path, images, (1, 64), cfg.parity_tolerance)
               for name, path in strict.items()}  # fmt: skip
    gated = _gate_candidates(cfg, all_logits, splits, {v: paths[v] for v in candidates})
    metrics = {"export_seconds": info["export_seconds"], "onnx_size_mb": info["size_bytes"] / 2**20}
    for name, report in reports.items():
        prefix = "parity" if name == "fp32" else f"parity_{name}"
        metrics[f"{prefix}_max_abs_diff"] = report.max_abs_diff
        metrics[f"{prefix}_top1_agreement"] = report.top1_agreement
    for name, c in gated.items():
        key = name.replace("-", "_")
        metrics |= {f"candidate_{key}_top1_agreement": c["top1_agreement"],
                    f"candidate_{key}_test_accuracy": c["test_accuracy"], f"candidate_{key}_size_mb": c["size_mb"]}  # fmt: skip
    tracking.log_metrics(cfg, run_id, metrics)
    tracking.client(cfg).log_dict(
        run_id,
        {name: r.to_dict() for name, r in reports.items()}
        | {"ops": info["ops"], "fusions": fusions, "candidates": gated},
        "export/parity.json",
    )
    passed = all(r.passed for r in reports.values())
    tracking.set_tags(cfg, run_id, {
        "export.parity": "passed" if passed else "failed", "export.serve_variant": cfg.serve_variant,
        "export.candidates": ",".join(n for n, c in gated.items() if c["passed"]) or "none",
    })  # fmt: skip
    for report in reports.values():
        parity_gate(report)
    _write_manifest(cfg, out, {n: c for n, c in gated.items() if c["passed"]})
    served = reports[cfg.serve_variant]
    return {
        **info,
        "path": paths[cfg.serve_variant],
        "fp32_path": paths["fp32"],
        "variant": cfg.serve_variant,
        "fusions": fusions,
        "candidates": {n: c for n, c in gated.items() if c["passed"]},
        "parity": {
            "max_abs_diff": max(r.max_abs_diff for r in reports.values()),
            "top1_agreement": min(r.top1_agreement for r in reports.values()),
            "num_images": served.num_images,
        },
    }


CANDIDATES_FILE = "candidates.json"


def _write_manifest(cfg: PipelineConfig, out: Path, passed: dict[str, dict]) -> None:
    """The serving candidates that passed their gate, registered beside the served file.

    The consumer reads it from the registered model (``extra_files/candidates.json``)
    and times the candidates on its own CPU at start-up.
    """
    import json

    from vit_pipeline.fsutil import write_text

    doc = {"served_variant": cfg.serve_variant, "min_agreement": cfg.candidate_min_agreement,
           "candidates": {n: {**{k: v for k, v in c.items() if k != "path"}, "file": Path(c["path"]).name}
                          for n, c in passed.items()}}  # fmt: skip
    write_text(out / CANDIDATES_FILE, json.dumps(doc, indent=2))


def _registered_variants(cfg: PipelineConfig, work: Path) -> tuple[str, ...]:
    """The served variant and the candidates the export registered beside it."""
    import json

    manifest = work / CANDIDATES_FILE
    passed = list(json.loads(manifest.read_text())["candidates"]) if manifest.exists() else []
    return (cfg.serve_variant, *passed)


def _gate_candidates(
    cfg: PipelineConfig, keras_logits: np.ndarray, splits: data.Splits, paths: dict[str, str]
) -> dict[str, dict]:
    """Top-1 agreement with Keras and test accuracy of each candidate on real test images."""
    from vit_pipeline.evaluate import topk_accuracy
    from vit_pipeline.export import ort_session, run_onnx
    from vit_pipeline.progress import task

    if not paths:
        return {}
    images, labels = splits.x_test[: cfg.candidate_images], splits.y_test[: cfg.candidate_images]
    keras_top1 = keras_logits[: len(images)].argmax(1)
    keras_accuracy = float(np.mean(keras_top1 == labels))
    out = {}
    for name, path in paths.items():
        with task(f"Candidate gate: {name} vs Keras", len(images)) as shown:
            logits = run_onnx(ort_session(path), images, 64, shown)
        agreement = float(np.mean(logits.argmax(1) == keras_top1))
        out[name] = {
            "path": path, "top1_agreement": agreement, "test_accuracy": topk_accuracy(logits, labels, 1),
            "keras_test_accuracy": keras_accuracy, "images": int(len(labels)),
            "size_mb": Path(path).stat().st_size / 2**20, "passed": agreement >= cfg.candidate_min_agreement,
        }  # fmt: skip
        log.info("Candidate %s: agreement %.4f with Keras on %d test images (%s)", name, agreement, len(labels),
                 "passed" if out[name]["passed"] else f"below {cfg.candidate_min_agreement}")  # fmt: skip
    return out


def benchmark_stage(
    cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str, model_path: str, fp32_onnx: str
) -> dict:
    """Times Keras, ONNX Runtime and OpenVINO on the exported files with real test images; logs the report.

    The variant files are the ones the export built and gated (the registered
    ones); variants the export did not build are built here from the fp32 file.
    The candidate this machine would serve is recorded (``benchmark.served_choice``).
    """

    from vit_pipeline import benchmark as bench
    from vit_pipeline.model import load_model
    from vit_pipeline.variants import calibration_sample, file_name

    cfg = _cfg(cfg)
    splits = data.Splits.load(data_path)
    work = tracking.work_dir(run_id)
    out = work / "benchmark"
    variants = tuple(cfg.benchmark_variant_list)
    built = {v: work / file_name(v) for v in variants if (work / file_name(v)).exists()}
    providers = cfg.benchmark_provider_list
    report, files = bench.benchmark_files(
        fp32_onnx, out, keras_model=load_model(model_path), eval_images=splits.x_test[:512],
        eval_labels=splits.y_test[:512], variants=variants, providers=providers,
        scenario=bench.Scenario(batch_sizes=cfg.benchmark_batch_sizes, min_seconds=cfg.benchmark_seconds,
                                rounds=cfg.benchmark_rounds),
        model_info={"name": f"vit-{cfg.dataset_tag}", "mlflow_run_id": run_id}, variant_paths=built,
        calibration=calibration_sample(splits.x_train, cfg.int8_calibration_images, cfg.seed),
        min_agreement=cfg.candidate_min_agreement, keras_path=model_path,
        roofline_seconds=min(2.0, 4 * cfg.benchmark_seconds), serve_candidates=_registered_variants(cfg, work),
    )  # fmt: skip
    metrics = {}
    for r in report.results:
        key = f"bench_{r.backend}_{r.provider.replace('ExecutionProvider', '').lower()}_{r.variant}_b{r.batch_size}"
        key = key.replace("-", "_")
        metrics[f"{key}_ips"] = r.throughput_ips
        metrics[f"{key}_p50_ms"] = r.latency_ms.p50
        if r.top1_agreement is not None and r.batch_size == report.settings["batch_sizes"][0]:
            name = f"agreement_{r.provider.replace('ExecutionProvider', '').lower()}_{r.variant}".replace(
                "-", "_"
            )
            metrics[name] = r.top1_agreement
    for precision, roof in report.rooflines().items():
        metrics[f"{'s' if precision == 'fp32' else precision + '_'}gemm_roofline_gflops"] = roof["gflops"]
    tracking.log_metrics(cfg, run_id, metrics)
    if report.choice.get("label"):
        tracking.set_tags(cfg, run_id, {"benchmark.served_choice": report.choice["label"],
                                        "benchmark.cpu": report.environment.get("cpu_model", "")})  # fmt: skip
    tracking.log_artifacts(cfg, run_id, [files[key] for key in ("json", "markdown", "plot")], "benchmark")
    return {"report_path": str(files["json"]), "rows": _table_rows(report), "ratios": report.ratios(),
            "choice": report.choice}  # fmt: skip


def _table_rows(report) -> list[dict[str, Any]]:
    """The benchmark as rows for a Prefect table artifact."""
    return [
        {"backend": r.backend, "provider": r.provider, "variant": r.variant, "precision": r.precision,
         "batch": r.batch_size,
         "p50_ms": round(r.latency_ms.p50, 3), "p99_ms": round(r.latency_ms.p99, 3),
         "img_per_s": round(r.throughput_ips, 1), "top1": r.top1, "agreement": r.top1_agreement}
        for r in report.results
    ]  # fmt: skip


def register_stage(
    cfg: PipelineConfig | dict[str, Any], run_id: str, data_path: str, onnx_path: str, test_accuracy: float
) -> dict:
    """Registers the served ONNX file; the champion policy judges it on the full test split."""
    from vit_pipeline.registry import TestSplit, register_onnx

    cfg = _cfg(cfg)
    split = TestSplit.from_splits(data.Splits.load(data_path))
    manifest = Path(onnx_path).parent / CANDIDATES_FILE
    return register_onnx(cfg, run_id, onnx_path, split, keras_test_accuracy=test_accuracy,
                         candidates=str(manifest) if manifest.exists() else None).to_dict()  # fmt: skip


def champion_stage(model_name: str, alias: str, tracking_uri: str | None) -> dict:
    """Finds the registry version behind ``alias`` and the run that produced it."""
    from vit_pipeline.config import make_config
    from vit_pipeline.errors import PipelineError
    from vit_pipeline.registry import current_champion

    cfg = make_config("quickstart", {"tracking_uri": tracking_uri})
    client = tracking.client(cfg)
    tracking.reap_once(cfg)
    version = current_champion(client, model_name, alias)
    if version is None:
        raise PipelineError(f"No version of {model_name!r} holds the alias {alias!r}")
    keras_uri = client.get_run(version.run_id).data.tags.get(
        KERAS_MODEL_TAG, f"runs:/{version.run_id}/keras-model"
    )
    return {"name": model_name, "version": str(version.version), "run_id": version.run_id,
            "test_accuracy": version.tags.get("test_accuracy"), "dataset": version.tags.get("dataset"),
            "keras_model_uri": keras_uri}  # fmt: skip


def benchmark_champion_stage(champion: dict, tracking_uri: str | None, options: dict[str, Any]) -> dict:
    """Re-exports the champion's Keras model and benchmarks it; logs a new MLflow run.

    The champion's run keeps its Keras model (``keras-model``); exporting it again
    gives the plain fp32 graph every variant is built from, and Keras as baseline.
    """
    import tempfile

    import mlflow

    from vit_pipeline import benchmark as bench
    from vit_pipeline.config import make_config
    from vit_pipeline.export import build_metadata, export_onnx

    cfg = make_config("quickstart", {"tracking_uri": tracking_uri, "experiment_name": "vit-benchmarks"})
    tracking.client(cfg)

    model = mlflow.keras.load_model(champion["keras_model_uri"])
    tags = {"registry.model": f"{champion['name']}/{champion['version']}",
            "vit_pipeline.command": "benchmark-champion"}  # fmt: skip
    with runs.tracked_run(cfg, None, tags) as run_id:
        out = Path(tempfile.mkdtemp(prefix="vit-bench-"))
        shape = tuple(model.inputs[0].shape[1:])
        classes = [f"class_{i}" for i in range(model.outputs[0].shape[-1])]
        fp32 = out / "model.onnx"
        export_onnx(model, fp32, build_metadata(classes, shape))
        report, files = bench.benchmark_files(
            fp32, out, keras_model=model,
            variants=tuple(config_mod.split_names(options["variants"])),
            providers=config_mod.split_names(options.get("providers") or "") or None,
            scenario=bench.Scenario(batch_sizes=tuple(options["batch_sizes"]), min_seconds=options["seconds"],
                                    rounds=options["rounds"]),
            model_info={"name": f"{champion['name']} v{champion['version']}"},
        )  # fmt: skip
        tracking.log_metrics(cfg, run_id, {f"{r.variant}_{r.provider}_b{r.batch_size}_ips".replace(
            "ExecutionProvider", "").lower(): r.throughput_ips for r in report.results})  # fmt: skip
        tracking.log_artifacts(cfg, run_id, [files[key] for key in ("json", "markdown", "plot")], "benchmark")
    return {"mlflow_run_id": run_id, "rows": _table_rows(report), "ratios": report.ratios()}


def trial_stage(preset: str, cfg: PipelineConfig | dict[str, Any], parent_run_id: str, index: int,
                varying: dict[str, Any]) -> dict:  # fmt: skip
    """One sweep trial: its own MLflow run nested under the sweep's, data, training.

    Returns metrics and paths, never the model. A failed trial's MLflow run ends
    FAILED with the error as a tag (``runs.lifecycle``), and the error is raised
    again so the orchestrator records the trial as failed.
    """
    import os
    import socket
    import time

    import keras

    cfg = _cfg(cfg)
    keras.backend.clear_session()  # a worker process runs trial after trial
    tags = {"mlflow.parentRunId": parent_run_id, "sweep.trial": str(index),
            **{f"sweep.param.{k}": str(v) for k, v in varying.items()}}  # fmt: skip
    start = time.time()
    where = {"pid": os.getpid(), "host": socket.gethostname()}
    with runs.tracked_run(cfg, preset, tags) as run_id:
        source = fetch_stage(cfg)
        prepared = prepare_stage(cfg, run_id, source)
        trained = train_stage(cfg, run_id, prepared["data_path"])
    return {
        "status": "ok",
        "index": index,
        "run_id": run_id,
        "params": varying,
        "best_val_accuracy": trained["best_val_accuracy"],
        "model_path": trained["model_path"],
        "history_path": trained["history_path"],
        "data_path": prepared["data_path"],
        "start": start,
        "end": time.time(),
        **where,
    }
