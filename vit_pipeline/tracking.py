"""MLflow tracking: where runs go, how they are opened, and the per-epoch logger.

Default location (one place): ``$VIT_PIPELINE_HOME`` (default ``./vit-runs``)
holds ``mlflow.db`` (the SQLite tracking store), ``artifacts/`` (run artifacts)
and ``work/`` (stage outputs such as the prepared data and checkpoints). Set
``MLFLOW_TRACKING_URI`` or the ``tracking_uri`` config field to use a server.

MLflow's active run is per thread, and Prefect runs tasks in worker threads, so
stages receive an explicit ``run_id`` and log through ``MlflowClient`` (the
helpers below); a run's status is ``vit_pipeline.runs``' business alone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from vit_pipeline import __version__
from vit_pipeline.config import PipelineConfig


def home() -> Path:
    """The pipeline's local state directory (``$VIT_PIPELINE_HOME`` or ``./vit-runs``)."""
    return Path(os.environ.get("VIT_PIPELINE_HOME", "vit-runs")).resolve()


def work_dir(run_id: str) -> Path:
    """Directory for one run's intermediate files (prepared data, checkpoints)."""
    path = home() / "work" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(cfg: PipelineConfig | None = None) -> str:
    """Config field, then ``$MLFLOW_TRACKING_URI``, then the local SQLite store."""
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{home() / 'mlflow.db'}"


def _is_local(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def client(cfg: PipelineConfig | None = None):
    """An MlflowClient for the configured store; also sets the global tracking and registry URIs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # The registry lives in the same store; a registry URI set elsewhere in the process must not win.
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(cfg: PipelineConfig) -> str:
    """Gets or creates the config's experiment (one per dataset by default)."""
    c = client(cfg)
    name = cfg.resolved_experiment_name
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local(tracking_uri(cfg)):
        # Keep artifacts beside the SQLite store, not in ./mlruns of whatever cwd.
        location = (home() / "artifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first (runs started at the same moment)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def config_params(cfg: PipelineConfig, preset: str | None = None) -> dict[str, str]:
    """Every config value as an MLflow param, plus derived values worth comparing."""
    params = {k: ("None" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
              for k, v in cfg.to_dict().items()}  # fmt: skip
    params["num_patches"] = str(cfg.num_patches)
    params["weight_decay_tfa_equivalent"] = weight_decay_tfa_equivalent(cfg)
    if preset:
        params["preset"] = preset
    return params


def weight_decay_tfa_equivalent(cfg: PipelineConfig) -> str:
    """What the seed's tensorflow-addons AdamW would call this run's weight decay.

    Keras decays ``lr(t) * weight_decay * w`` per step, tfa ``wd * w``. With a
    constant rate that is one number, ``lr * weight_decay``; under a schedule the
    per-step decay follows the rate, so the tfa equivalent is a schedule too.
    """
    peak = cfg.weight_decay * cfg.learning_rate
    if cfg.lr_schedule == "constant":
        return f"{peak:g}"
    return f"{cfg.weight_decay:g} x lr(t) ({cfg.lr_schedule}; peak {peak:g}, 0 at the end)"


def check_reachable(cfg: PipelineConfig) -> None:
    """Fails fast, before any training, if an HTTP tracking server does not answer.

    Retries for ``cfg.tracking_wait_seconds`` (a server that is just starting);
    MLflow's own client would otherwise retry each request for minutes.

    Raises:
        TrackingUnavailable: the server did not answer ``/health`` in time.
    """
    import time

    from vit_pipeline.errors import TrackingUnavailable

    uri = tracking_uri(cfg)
    deadline = time.monotonic() + cfg.tracking_wait_seconds
    while (problem := _health_problem(uri, timeout=5.0)) is not None:
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({problem}) after {cfg.tracking_wait_seconds:g} s; "
                "nothing was trained. Start it, or set --tracking-uri / MLFLOW_TRACKING_URI."
            )
        time.sleep(1.0)


def _health_problem(uri: str, timeout: float) -> str | None:
    """None if the store answers (local stores always do), else what went wrong."""
    import urllib.request

    if _is_local(uri):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except OSError as exc:
        return str(getattr(exc, "reason", exc))


def create_run(cfg: PipelineConfig, preset: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Creates a run in the config's experiment, logs every config value; returns its id."""
    check_reachable(cfg)
    c = client(cfg)
    reap_once(cfg)
    exp_id = experiment_id(cfg)
    from mlflow.entities import Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    all_tags = {"vit_pipeline.version": __version__, "dataset": cfg.dataset_tag, **(tags or {})}
    if cfg.run_name:
        all_tags[MLFLOW_RUN_NAME] = cfg.run_name
    from vit_pipeline.runs import owner_tags

    run = c.create_run(exp_id, run_name=cfg.run_name, tags={**all_tags, **owner_tags()})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in config_params(cfg, preset).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    c.log_batch(run_id, tags=[RunTag("mlflow.note.content", _note(cfg, preset))])
    return run_id


def resume_run(cfg: PipelineConfig, run_id: str) -> str:
    """Checks that ``run_id`` may be continued after a crash with ``cfg``.

    A run whose owner died is first marked KILLED (``runs.reap``); one whose owner
    is still alive is refused. ``runs.lifecycle`` then sets it RUNNING again.

    Raises:
        ConfigError: unknown run, or a config value that differs from the run's.
        TrainingInProgress: the run's owner process is alive.
    """
    from mlflow.exceptions import MlflowException

    from vit_pipeline.errors import ConfigError, TrainingInProgress
    from vit_pipeline.runs import liveness

    check_reachable(cfg)
    c = client(cfg)
    reap_once(cfg)
    try:
        run = c.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"Cannot resume: no MLflow run {run_id!r} at {tracking_uri(cfg)}") from exc
    logged = run.data.params
    for key, value in config_params(cfg).items():
        if key in logged and logged[key] != value and not _operational(key):
            raise ConfigError(
                f"Cannot resume run {run_id}: {key} differs. Received: {key}={value}, run has {logged[key]}"
            )
    if run.info.status == "RUNNING" and (verdict := liveness(run.data.tags)).alive:
        raise TrainingInProgress(f"Cannot resume run {run_id}: it is RUNNING ({verdict.reason})")
    return run_id


_reaped: set[str] = set()


def reap_once(cfg: PipelineConfig) -> list[str]:
    """``runs.reap`` the first time this process opens a store (a warning if it cannot)."""
    from vit_pipeline.runs import reap

    uri = tracking_uri(cfg)
    if uri in _reaped:
        return []
    _reaped.add(uri)
    try:
        return reap(client(cfg))
    except Exception as exc:  # never block the caller's own work on it
        logging.getLogger(__name__).warning("Could not check %s for runs of dead processes: %s", uri, exc)
        return []


def _operational(field: str) -> bool:
    """Fields that may change between a crash and its resume (they do not touch the model)."""
    # distribution_strategy too: a run may resume on a machine with other devices.
    # Fields that do not change what is trained: a resume may set them anew (export candidates too).
    operational = ("tracking_uri", "tracking_wait_seconds", "run_name", "distribution_strategy",
                   "system_metrics_seconds", "serve_candidates", "candidate_min_agreement", "candidate_images",
                   "int8_calibration_images")  # fmt: skip
    return field in operational or field.startswith("benchmark_")


def _note(cfg: PipelineConfig, preset: str | None) -> str:
    return (
        f"ViT on `{cfg.dataset_tag}` (preset `{preset or 'custom'}`): image {cfg.image_size}, "
        f"patch {cfg.patch_size}, dim {cfg.projection_dim}, {cfg.transformer_layers} blocks, "
        f"{cfg.epochs} epochs."
    )


def run_url(cfg: PipelineConfig, run_id: str) -> str:
    """A URL that opens the run in the MLflow UI.

    For a local store it assumes ``mlflow ui`` on its default port (README).
    """
    c = client(cfg)
    run = c.get_run(run_id)
    uri = tracking_uri(cfg)
    base = uri.rstrip("/") if not _is_local(uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def open_hint(cfg: PipelineConfig) -> str:
    """How to open ``run_url`` when no tracking server is running (a local store); else ""."""
    uri = tracking_uri(cfg)
    if not _is_local(uri):
        return ""
    return f"(no MLflow server runs for a local store; open it with: mlflow ui --backend-store-uri {uri})"


def log_epoch_metrics(cfg: PipelineConfig, run_id: str, epoch: int, logs: dict[str, float]) -> None:
    """Logs one epoch's Keras metrics with ``step=epoch`` in a single request."""
    log_metrics(cfg, run_id, logs, step=epoch)


def log_metrics(cfg: PipelineConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Logs numeric values to ``run_id`` in batches (one request per 1,000)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    c = client(cfg)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def log_params(cfg: PipelineConfig, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    c = client(cfg)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def set_tags(cfg: PipelineConfig, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    client(cfg).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(cfg: PipelineConfig, run_id: str, paths, artifact_dir: str) -> None:
    """Uploads local files into ``artifact_dir`` of the run."""
    c = client(cfg)
    for path in paths:
        c.log_artifact(run_id, str(path), artifact_dir)


def server_up(cfg: PipelineConfig, timeout: float = 2.0) -> bool:
    """Quick health probe; local stores are always up."""
    return _health_problem(tracking_uri(cfg), timeout) is None


def sync_epochs(cfg: PipelineConfig, run_id: str, epochs: dict[int, dict[str, float]]) -> list[int]:
    """Sends the epochs MLflow does not have yet (step = epoch); returns what was sent.

    Used after the tracking server was away: the epoch log on disk is the truth.
    """
    have = {m.step for m in client(cfg).get_metric_history(run_id, "loss")}
    missing = [e for e in sorted(epochs) if e not in have]
    for epoch in missing:
        log_epoch_metrics(cfg, run_id, epoch, epochs[epoch])
    return missing


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
