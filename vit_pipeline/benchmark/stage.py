"""The benchmark stage of a pipeline run, the champion's weekly benchmark, and the CLI's model inputs.

Every report is logged the same way (``BenchmarkReport.mlflow_metrics`` names the
metrics; the JSON, Markdown and plot are artifacts under ``benchmark/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vit_pipeline.benchmark.report import BenchmarkReport
from vit_pipeline.benchmark.run import benchmark_files, fresh_keras_model
from vit_pipeline.benchmark.scenario import Scenario
from vit_pipeline.fsutil import scratch_dir

if TYPE_CHECKING:
    import numpy as np

    from vit_pipeline.context import StageContext
    from vit_pipeline.registry import Champion
    from vit_pipeline.tracking import RunLogger


@dataclass(frozen=True)
class BenchmarkOutcome:
    """What the benchmark hands on: where its report is (a file, or the ``runs:/`` URI it was logged to), its
    rows, the ratios and the served choice."""

    report_path: str
    rows: list[dict[str, Any]]
    ratios: list[str]
    choice: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"report_path": self.report_path, "rows": self.rows, "ratios": self.ratios, "choice": self.choice,
                **({"mlflow_run_id": self.mlflow_run_id} if self.mlflow_run_id else {})}  # fmt: skip


def log_report(logger: RunLogger, report: BenchmarkReport, files: dict[str, Path]) -> None:
    """The report's metrics, its served choice and CPU as tags, its files as artifacts."""
    logger.metrics(report.mlflow_metrics())
    if report.choice.get("label"):
        served = report.first_row(report.choice["label"])
        logger.tags({"benchmark.served_choice": report.choice["label"],  # an identifier: runs are filtered by it
                     "benchmark.served_precision": served.precision if served else "",
                     "benchmark.cpu": report.environment.get("cpu_model", "")})  # fmt: skip
    logger.artifacts([files[key] for key in ("json", "markdown", "plot")], "benchmark")


def run(ctx: StageContext, data_path: str, model_path: str, fp32_onnx: str) -> BenchmarkOutcome:
    """The benchmark stage: Keras, ONNX Runtime and OpenVINO on the exported files with real test images.

    The variant files are the ones the export built and gated (the registered
    ones); variants the export did not build are built here from the fp32 file.
    The candidate this machine would serve is recorded (``benchmark.served_choice``).
    """
    from vit_pipeline.data import Splits
    from vit_pipeline.export import registered_variants
    from vit_pipeline.model import load_model
    from vit_pipeline.variants import calibration_sample, file_name

    cfg = ctx.cfg
    splits = Splits.load(data_path)
    work = ctx.work_dir
    variants = tuple(cfg.benchmark_variant_list)
    built = {v: work / file_name(v) for v in variants if (work / file_name(v)).exists()}
    report, files = benchmark_files(
        fp32_onnx, work / "benchmark", keras_model=load_model(model_path), eval_images=splits.x_test[:512],
        eval_labels=splits.y_test[:512], variants=variants, providers=cfg.benchmark_provider_list,
        scenario=Scenario(batch_sizes=cfg.benchmark_batch_sizes, min_seconds=cfg.benchmark_seconds,
                          rounds=cfg.benchmark_rounds),
        model_info={"name": f"vit-{cfg.dataset_tag}", "mlflow_run_id": ctx.run_id}, variant_paths=built,
        calibration=calibration_sample(splits.x_train, cfg.int8_calibration_images, cfg.seed),
        min_agreement=cfg.candidate_min_agreement, keras_path=model_path,
        roofline_seconds=min(2.0, 4 * cfg.benchmark_seconds), serve_candidates=registered_variants(cfg, work),
    )  # fmt: skip
    log_report(ctx.log, report, files)
    return BenchmarkOutcome(str(files["json"]), report.table_rows(), report.ratios(), report.choice)


def run_champion(champion: Champion, tracking_uri: str | None, options: dict[str, Any],
                 extra_tags: dict[str, str] | None = None) -> BenchmarkOutcome:  # fmt: skip
    """Re-exports the champion's Keras model and benchmarks it; logs a new MLflow run (``vit-benchmarks``).

    The champion's run keeps its Keras model (``keras-model``); exporting it again
    gives the plain fp32 graph every variant is built from, and Keras as baseline.
    """
    from vit_pipeline import runs, tracking
    from vit_pipeline.config import make_config, split_names
    from vit_pipeline.mlflow_models import load_keras

    cfg = make_config("quickstart", {"tracking_uri": tracking_uri, "experiment_name": "vit-benchmarks"})
    with tracking.fluent_store(cfg):
        model = load_keras(champion.keras_model_uri)
    tags = {
        "registry.model": f"{champion.name}/{champion.version}",
        "vit_pipeline.command": "benchmark-champion",
        **(extra_tags or {}),  # the Prefect flow run's: a crashed flow run's run is ended KILLED by it
    }
    with runs.tracked_run(cfg, None, tags) as run_id:
        out = scratch_dir("vit-bench-")  # the report is logged; the files go when the process ends
        report, files = benchmark_files(
            export_plain(model, out / "model.onnx"), out, keras_model=model,
            variants=tuple(split_names(options["variants"])),
            providers=split_names(options.get("providers") or "") or None,
            scenario=Scenario(batch_sizes=tuple(options["batch_sizes"]), min_seconds=options["seconds"],
                              rounds=options["rounds"]),
            model_info={"name": f"{champion.name} v{champion.version}"},
        )  # fmt: skip
        log_report(tracking.RunLogger.open(cfg, run_id), report, files)
    # The files went with the process's scratch folder: the report is where it was logged.
    logged = f"runs:/{run_id}/benchmark/{files['json'].name}"
    return BenchmarkOutcome(logged, report.table_rows(), report.ratios(), report.choice, run_id)


def export_plain(model, path: Path) -> str:
    """The plain fp32 ONNX export of a Keras model with placeholder class names (what is timed)."""
    from vit_pipeline.export import build_metadata, export_onnx

    classes = [f"class_{i}" for i in range(model.outputs[0].shape[-1])]
    return export_onnx(model, path, build_metadata(classes, tuple(model.inputs[0].shape[1:])))["path"]


@dataclass(frozen=True)
class Models:
    """What the ``benchmark`` command times: an ONNX file and, where there is one, the Keras model."""

    onnx_path: str
    keras_model: Any = None
    keras_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def models_to_time(
    model_path: str | None, preset: str | None, keras_path: str | None, out_dir: Path,
    labels: np.ndarray | None = None,
) -> Models:  # fmt: skip
    """The benchmark command's inputs: an ONNX file (with its .keras), a .keras alone (exported here),
    or a preset's architecture with fresh weights (built, saved and exported here). Checked before
    ``out_dir`` is made: ``labels`` (of the evaluation images) must be classes the model predicts.

    Raises:
        ConfigError: not exactly one of the three was given.
        DataError: a file is missing or not a loadable model, or the labels name classes it has not.
    """
    from vit_pipeline.config import make_config
    from vit_pipeline.errors import ConfigError, DataError, PipelineError

    if sum((model_path is not None, preset is not None, model_path is None and keras_path is not None)) != 1:
        raise ConfigError("Expected exactly one of MODEL_PATH, --preset, or --keras alone (exported here)")
    for path, what in ((model_path, "Model"), (keras_path, "Keras model")):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{what} file does not exist: {path}")
    cfg = make_config(preset) if preset is not None else None
    keras_model = _load_keras(keras_path) if keras_path else None
    if model_path is not None:
        from vit_pipeline.export import ort_session

        try:
            session = ort_session(model_path)
        except PipelineError as exc:
            raise DataError(f"{model_path} is not a loadable ONNX model") from exc
        from vit_consumer import contract

        inputs, outputs = contract.ort_dims(session.get_inputs()), contract.ort_dims(session.get_outputs())
        if problem := contract.io_problem(inputs, outputs, None, batched=False):  # any ONNX classifier
            raise DataError(f"{model_path} is not an image classifier: {problem}")
        _check_labels(labels, outputs[0][1], model_path)
        return Models(model_path, keras_model, keras_path, {"name": Path(model_path).name})
    if preset is not None:
        keras_model = fresh_keras_model(cfg)
        info = {"name": f"{preset} preset architecture, fresh weights"}
    else:
        info = {"name": Path(keras_path).name}
    _check_labels(labels, keras_model.output_shape[-1], keras_path or preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    if preset is not None:
        keras_path = str(out_dir / "model.keras")
        keras_model.save(keras_path)
    info["params"] = int(keras_model.count_params())
    return Models(export_plain(keras_model, out_dir / "model.onnx"), keras_model, keras_path, info)


def _load_keras(path: str):
    from vit_pipeline.errors import DataError
    from vit_pipeline.model import load_model

    try:
        return load_model(path)
    except Exception as exc:  # a zip that is no model, another format: one line
        raise DataError(
            f"{path} is not a loadable Keras model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _check_labels(labels: np.ndarray | None, classes: int | str | None, what: str) -> None:
    """The evaluation images' labels are classes the model predicts (a 10-class model on CIFAR-100's 100
    failed in the accuracy, after every timing)."""
    from vit_pipeline.errors import DataError

    if labels is not None and isinstance(classes, int) and len(labels) and int(labels.max()) >= classes:
        raise DataError(f"{what} predicts {classes} classes; --eval-data labels go up to {int(labels.max())}")
