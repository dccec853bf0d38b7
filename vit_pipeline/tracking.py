"""MLflow tracking: where runs go, how they are opened, and the per-epoch logger.

Default location (one place): ``$VIT_PIPELINE_HOME`` (default ``./vit-runs``)
holds ``mlflow.db`` (the SQLite tracking store), ``artifacts/`` (run artifacts)
and ``work/`` (stage outputs such as the prepared data and checkpoints). Set
``MLFLOW_TRACKING_URI`` or the ``tracking_uri`` config field to use a server.

MLflow's active run is per thread, and Prefect runs tasks in worker threads, so
stages receive an explicit ``run_id`` and reopen the run with ``open_run``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
    """An MlflowClient for the configured store; also sets the global tracking URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


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
    return c.create_experiment(name, artifact_location=location)


def config_params(cfg: PipelineConfig, preset: str | None = None) -> dict[str, str]:
    """Every config value as an MLflow param, plus derived values worth comparing."""
    params = {k: ("None" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
              for k, v in cfg.to_dict().items()}  # fmt: skip
    params["num_patches"] = str(cfg.num_patches)
    # What the seed (tensorflow-addons AdamW) would have called its weight decay.
    params["weight_decay_tfa_equivalent"] = f"{cfg.weight_decay * cfg.learning_rate:g}"
    if preset:
        params["preset"] = preset
    return params


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
    exp_id = experiment_id(cfg)
    from mlflow.entities import Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    all_tags = {"vit_pipeline.version": __version__, "dataset": cfg.dataset_tag, **(tags or {})}
    if cfg.run_name:
        all_tags[MLFLOW_RUN_NAME] = cfg.run_name
    run = c.create_run(exp_id, run_name=cfg.run_name, tags=all_tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in config_params(cfg, preset).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    c.log_batch(run_id, tags=[RunTag("mlflow.note.content", _note(cfg, preset))])
    return run_id


def resume_run(cfg: PipelineConfig, run_id: str) -> str:
    """Reopens ``run_id`` after a crash; its config must be the same as ``cfg``.

    Raises:
        ConfigError: unknown run, or a config value that differs from the run's.
    """
    from mlflow.exceptions import MlflowException

    from vit_pipeline.errors import ConfigError

    check_reachable(cfg)
    c = client(cfg)
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
    c.update_run(run_id, status="RUNNING")
    return run_id


def _operational(field: str) -> bool:
    """Fields that may change between a crash and its resume (they do not touch the model)."""
    # distribution_strategy too: a run may resume on a machine with other devices.
    operational = ("tracking_uri", "tracking_wait_seconds", "run_name", "distribution_strategy")
    return field in operational or field.startswith("benchmark_")


def _note(cfg: PipelineConfig, preset: str | None) -> str:
    return (
        f"ViT on `{cfg.dataset_tag}` (preset `{preset or 'custom'}`): image {cfg.image_size}, "
        f"patch {cfg.patch_size}, dim {cfg.projection_dim}, {cfg.transformer_layers} blocks, "
        f"{cfg.epochs} epochs."
    )


@contextlib.contextmanager
def open_run(cfg: PipelineConfig, run_id: str) -> Iterator[Any]:
    """Makes ``run_id`` the active run in this thread (fluent API) for a stage."""
    import mlflow

    client(cfg)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield active
        return
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def run_url(cfg: PipelineConfig, run_id: str) -> str:
    """A URL that opens the run in the MLflow UI.

    For a local store it assumes ``mlflow ui`` on its default port (README).
    """
    c = client(cfg)
    run = c.get_run(run_id)
    uri = tracking_uri(cfg)
    base = uri.rstrip("/") if not _is_local(uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def log_epoch_metrics(cfg: PipelineConfig, run_id: str, epoch: int, logs: dict[str, float]) -> None:
    """Logs one epoch's Keras metrics with ``step=epoch`` in a single request."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, epoch) for k, v in logs.items() if _is_number(v)]
    client(cfg).log_batch(run_id, metrics=metrics)


def finish_run(cfg: PipelineConfig, run_id: str, status: str) -> None:
    """Marks the run FINISHED/FAILED; a tracking server that is away only gets a warning.

    (The run stays RUNNING there; ``--resume`` closes it later.)
    """
    import logging

    try:
        client(cfg).set_terminated(run_id, status)
    except Exception as exc:  # MLflow raises several types for connection errors
        logging.getLogger(__name__).warning("Could not mark run %s %s: %s", run_id, status, exc)


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
