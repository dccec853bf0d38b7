"""The ``train-pipeline`` flow: fetch, prepare, train, evaluate, export, benchmark, register, model card.

One Prefect task per stage; tasks pass paths and metrics, never models. The
MLflow run is created here and its id handed to every task, because MLflow's
active run is per thread and Prefect runs tasks in worker threads. The run is
RUNNING for the whole flow and ends with it (``vit_pipeline.runs``): FINISHED
when the flow completes, FAILED when a stage raises, KILLED when the flow run is
cancelled or crashes (the ``on_crashed`` / ``on_cancellation`` hooks), or, if its
process was SIGKILLed with no chance to say so, at the next command that opens
the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from vit_pipeline import (
    calibration,
    data,
    data_validation,
    evaluate,
    export,
    infra_validation,
    model_card,
    progress,
    registry,
    robustness,
    runs,
    summary,
    tracking,
    train,
)
from vit_pipeline.benchmark import stage as benchmark_stage
from vit_pipeline.benchmark.stage import BenchmarkOutcome
from vit_pipeline.config import ConfigOverrides, PipelineConfig, PresetName, make_config
from vit_pipeline.context import StageContext
from vit_pipeline.evaluate import EvalResult
from vit_pipeline.flows import artifacts
from vit_pipeline.registry import Registration


# Each task is one stage's entry, wrapped; stages take the run's StageContext and return typed results.
@task(name="fetch-data", retries=3, retry_delay_seconds=[10, 30, 60], cache_policy=NO_CACHE)
def fetch_data(cfg: PipelineConfig) -> str | None:
    # Only the download is worth retrying; everything else fails the same way twice.
    return data.fetch(cfg)


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(ctx: StageContext, source_path: str | None) -> data.Prepared:
    return data.run(ctx, source_path)


@task(name="validate-data", cache_policy=NO_CACHE)
def validate_data(ctx: StageContext, data_path: str) -> data_validation.DataValidation:
    return data_validation.run(ctx, data_path)


def tracking_was_down(task, task_run, state) -> bool:
    """Retry only when MLflow was away (``tracking.unavailable``): a retry resumes, it does not train again."""
    from vit_pipeline import tracking

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and tracking.unavailable(exc)


# A retry of train resumes from the last finished epoch (or, if training had
# finished, only uploads what MLflow missed), so it costs at most one epoch.
@task(name="train", retries=2, retry_delay_seconds=[30, 120], retry_condition_fn=tracking_was_down,
      cache_policy=NO_CACHE)  # fmt: skip
def train_model(ctx: StageContext, data_path: str) -> train.TrainResult:
    return train.run(ctx, data_path)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(
    ctx: StageContext, data_path: str, model_path: str, history_path: str | None
) -> EvalResult:
    return evaluate.run(ctx, data_path, model_path, history_path)


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_model(ctx: StageContext, data_path: str, model_path: str) -> calibration.Calibration:
    return calibration.run(ctx, data_path, model_path)


@task(name="robustness", cache_policy=NO_CACHE)
def measure_robustness(ctx: StageContext, data_path: str, model_path: str) -> robustness.Robustness:
    return robustness.run(ctx, data_path, model_path)


@task(name="export-onnx", cache_policy=NO_CACHE)
def export_model(
    ctx: StageContext, data_path: str, model_path: str, test_accuracy: float, temperature: float = 1.0
) -> export.ExportResult:
    return export.run(ctx, data_path, model_path, test_accuracy, temperature)


@task(name="infra-validate", cache_policy=NO_CACHE)
def infra_validate(ctx: StageContext, data_path: str, onnx_path: str) -> infra_validation.InfraValidation:
    return infra_validation.run(ctx, data_path, onnx_path)


@task(name="register", cache_policy=NO_CACHE)
def register_model(ctx: StageContext, data_path: str, onnx_path: str, test_accuracy: float) -> Registration:
    return registry.run(ctx, data_path, onnx_path, test_accuracy)


@task(name="benchmark", cache_policy=NO_CACHE)
def benchmark_model(ctx: StageContext, data_path: str, model_path: str, fp32_onnx: str) -> BenchmarkOutcome:
    result = benchmark_stage.run(ctx, data_path, model_path, fp32_onnx)
    artifacts.table(
        "inference-benchmark", result.rows, "Keras vs ONNX Runtime: latency, throughput, accuracy"
    )
    return result


@task(name="model-card", cache_policy=NO_CACHE)
def write_model_card(ctx: StageContext, registration: Registration) -> dict[str, str]:
    return model_card.run(ctx, registration)


@dataclass(frozen=True)
class Shipped:
    """What the stages after training returned: each flow that trains runs them in this one order."""

    evaluated: EvalResult
    calibrated: calibration.Calibration
    robust: robustness.Robustness
    exported: export.ExportResult
    served: infra_validation.InfraValidation
    registered: Registration
    benchmarked: BenchmarkOutcome
    card: dict[str, str]


def after_training(ctx: StageContext, data_path: str, model_path: str, history_path: str | None) -> Shipped:
    """Evaluate, calibrate, robustness, export (the parity gate raises: nothing registered), infra validation,
    benchmark, register and, last, the model card (it shows every stage's figures).

    The registration is the last stage but the card: a run stopped after it (Ctrl-C, SIGTERM, a failure)
    withdraws the promotion it made as it ends (``runs.lifecycle``, ``registry.withdraw_stopped``), so no run
    that ended KILLED or FAILED leaves its model champion (the benchmark ran after the registration: minutes in
    which a stop did). A SIGKILL leaves no time for it: whatever ends that run KILLED later withdraws it
    (``runs.end_run``: the next command's reaper, ``end-crashed-runs``); until then its version stays champion.
    """
    evaluated = evaluate_model(ctx, data_path, model_path, history_path)
    calibrated = calibrate_model(ctx, data_path, model_path)
    robust = measure_robustness(ctx, data_path, model_path)
    exported = export_model(ctx, data_path, model_path, evaluated.test_accuracy, calibrated.temperature)
    # The real consumer serves the files first; a failure keeps the version from becoming champion.
    served = infra_validate(ctx, data_path, exported.path)
    benchmarked = benchmark_model(ctx, data_path, model_path, exported.fp32_path)
    registered = register_model(ctx, data_path, exported.path, evaluated.test_accuracy)
    card = write_model_card(ctx, registered)
    return Shipped(evaluated, calibrated, robust, exported, served, registered, benchmarked, card)


def _prefect_tags() -> dict[str, str]:
    run_id = flow_run.get_id()
    if not run_id:
        return {}
    return {
        "prefect.flow_run_id": run_id,
        "prefect.flow_run_url": summary.prefect_run_url(run_id, flow_run.ui_url),
    }


def mark_mlflow_killed(flow, flow_run, state) -> None:
    """Prefect state hook: a crashed or cancelled flow run leaves no RUNNING/FINISHED MLflow run."""
    try:
        cfg = runs.flow_run_config(flow_run.parameters)
        killed = runs.mark_flow_run_killed(
            cfg, str(flow_run.id), f"Prefect flow run {state.type.value}: {state.message}"
        )
    except Exception as exc:  # a hook must not hide the flow's own failure
        print(f"Could not mark the MLflow run of flow run {flow_run.id}: {exc}")
        return
    if killed:
        print(f"Marked MLflow run(s) {', '.join(killed)} KILLED (flow run {state.type.value})")


@flow(
    name="train-pipeline",
    log_prints=True,
    on_crashed=[mark_mlflow_killed],
    on_cancellation=[mark_mlflow_killed],
)
def train_pipeline(
    preset: PresetName = "quickstart",
    config: ConfigOverrides = ConfigOverrides(),  # noqa: B008 (frozen: a shared default is safe)
    overrides: dict[str, Any] | None = None,
    resume_run_id: str | None = None,
) -> dict:
    """Trains, evaluates, exports and registers a ViT; everything lands in MLflow.

    Args:
        preset: A named config preset ("quickstart", "cifar100", ...).
        config: Typed config fields that replace the preset's (null: the preset's
            value); the Prefect UI shows each with its type and description, and
            the server refuses an unknown field or an invalid value.
        overrides: The untyped form of ``config`` (kept for old callers), e.g.
            ``{"epochs": 5, "data_path": "/data/cifar-100-python.tar.gz"}``;
            ``config`` wins where both set a field.
        resume_run_id: An MLflow run that crashed or was killed: continue it from
            its last finished epoch (same config required).

    Returns:
        The MLflow run id, its URL, the headline metrics, the parity figures and
        the registry decision.
    """
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    cfg = make_config(preset, overrides, config)  # invalid values fail here, before any work
    with runs.tracked_run(cfg, preset, _prefect_tags(), resume_run_id=resume_run_id) as run_id:
        # First: after a crash or a kill, this is the id that --resume (resume_run_id) continues.
        print(f"MLflow run {run_id} (resume with --resume {run_id}, or a deployment run's resume_run_id)")
        ctx = StageContext.open(cfg, run_id)
        prepared = prepare_data(ctx, fetch_data(cfg))
        # Anomalies against the dataset's schema fail here, before any training.
        validated = validate_data(ctx, prepared.data_path)
        data_path = validated.data_path  # without leaked test images when drop_leaked_test
        trained = train_model(ctx, data_path)
        shipped = after_training(ctx, data_path, trained.model_path, trained.history_path)
        evaluated, exported, registered = shipped.evaluated, shipped.exported, shipped.registered
        result = {
            "mlflow_run_id": run_id,
            "mlflow_run_url": tracking.run_url(cfg, run_id),
            "test_accuracy": evaluated.test_accuracy,
            "test_top5_accuracy": evaluated.test_top5_accuracy,
            "best_val_accuracy": trained.best_val_accuracy,
            "train_seconds": trained.train_seconds,
            "onnx_path": exported.path,
            "parity": {k: exported.parity[k] for k in ("max_abs_diff", "top1_agreement", "num_images")},
            "registry": registered.to_dict(),
            "gates": {
                "drift": validated.drift.outcome,
                "leakage": validated.leakage.outcome,
                **({"lineage": validated.lineage.outcome} if validated.lineage else {}),
                "calibration": shipped.calibrated.outcome,
                "robustness": shipped.robust.outcome,
                "infra_validation": shipped.served.outcome,
            },
            "benchmark": shipped.benchmarked.ratios,
            "model_card": shipped.card["html"],
        }
        artifacts.markdown(
            "train-pipeline-summary",
            summary.run_markdown(cfg, preset, result, prepared.summary),
            "ViT training run summary",
        )
    print(
        f"MLflow run {run_id}: test accuracy {result['test_accuracy']:.4f}, "
        f"top-5 {result['test_top5_accuracy']:.4f} -> {result['mlflow_run_url']} {tracking.open_hint(cfg)}".rstrip()
    )
    print(f"Registered {registered.model_uri}: {registered.outcome} ({registered.reason})")
    return result
