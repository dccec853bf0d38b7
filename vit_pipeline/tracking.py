"""MLflow tracking: where runs go, how they are opened, and the per-epoch logger.

Default location (one place): ``$VIT_PIPELINE_HOME`` (default ``./vit-runs``)
holds ``mlflow.db`` (the SQLite tracking store), ``artifacts/`` (run artifacts)
and ``work/`` (stage outputs such as the prepared data and checkpoints). Set
``MLFLOW_TRACKING_URI`` or the ``tracking_uri`` config field to use a server.

MLflow's active run is per thread, and Prefect runs tasks in worker threads, so
stages log through a ``RunLogger`` bound to one client and one run id; a run's
lifecycle (create, resume, claim, reap, end) is ``vit_pipeline.runs``' business
alone, and this module imports nothing of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit_pipeline.config import PipelineConfig
from vit_pipeline.errors import ConfigError
from vit_pipeline.fsutil import scratch_root


def home() -> Path:
    """The pipeline's local state directory (``$VIT_PIPELINE_HOME`` or ``./vit-runs``)."""
    return Path(os.environ.get("VIT_PIPELINE_HOME") or "vit-runs").resolve()  # set but empty: the default too


def work_dir(run_id: str) -> Path:
    """Directory for one run's intermediate files (prepared data, checkpoints)."""
    path = home() / "work" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(cfg: PipelineConfig | None = None) -> str:
    """Config field, then ``$MLFLOW_TRACKING_URI``, then the local SQLite store."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = home() / "mlflow.db"
    if {"?", "%"} & set(str(path)):  # SQLAlchemy would read the URI's path up to "?" or decode "%xx"
        raise ConfigError(
            f"Expected VIT_PIPELINE_HOME without '?' or '%' (its SQLite store is a URI). Received: {home()}"
        )
    return f"sqlite:///{path}"


def _is_local(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def client(cfg: PipelineConfig | None = None):
    """An MlflowClient for the configured store (tracking and registry in the same store).

    Sets no process-wide MLflow state: MLflow's fluent APIs that read it get it
    for one block only (``fluent_store``).
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and uri not in _OPENED:
        _open_sqlite(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_OPENED: set[str] = set()  # SQLite stores this process has opened (their schema exists and is current)


def _open_sqlite(uri: str) -> None:
    """Opens a SQLite store once per process, one process at a time.

    MLflow creates and migrates the schema when a process first opens the file: two commands
    started together on a fresh ``$VIT_PIPELINE_HOME`` (overlapping schedules) raced there,
    and one or both failed with an alembic or sqlite error.
    """
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    _check_sqlite_path(uri, db)
    with FileLock(f"{db}.lock", timeout=300):
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking tables
        c.search_registered_models(max_results=1)  # and the registry's
    _OPENED.add(uri)


def _check_sqlite_path(uri: str, db: Path) -> None:
    """A SQLite store's path is a SQLite file or none yet (MLflow retried a folder for 100 s, then a traceback)."""
    problem = ""
    if db.is_dir():
        problem = "is a folder"
    elif db.is_file() and db.stat().st_size:
        with open(db, "rb") as f:
            if f.read(16) != b"SQLite format 3\0":
                problem = "is not a SQLite database"
    if not problem:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"cannot be created ({exc.strerror or exc})"
    if problem:
        raise ConfigError(
            f"The MLflow store {uri} {problem}: give the path of a SQLite file (sqlite:////abs/path.db)"
        )


def fluent_store(cfg: PipelineConfig | None = None):
    """A context in which MLflow's fluent APIs (``Model.log``, ``mlflow.keras.load_model``,
    ``download_artifacts``) use the configured store; the previous URIs come back after it."""
    from vit_consumer.mlflow_store import store_uris

    return store_uris(tracking_uri(cfg))


def download_run_artifact(cfg: PipelineConfig, run_id: str, path: str, dst: str | Path) -> Path:
    """One file of a run's artifacts, downloaded into ``dst``, or the store's own error.

    ``MlflowClient.download_artifacts`` reports a store that did not answer as a missing path
    (MLflow 3 swallows the cause), which must not pass for "the run has no such file"
    (``unavailable``); the run's artifact repository raises what happened.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with fluent_store(cfg):  # mlflow-artifacts:/ locations resolve against the tracking server
        repo = get_artifact_repository(client(cfg).get_run(run_id).info.artifact_uri)
        return Path(repo.download_artifacts(path, str(dst)))


def read_run_file(cfg: PipelineConfig, run_id: str, path: str, read: Callable[[Path], Any],
                  outage: Callable[[BaseException], Exception]) -> tuple[Any, str]:  # fmt: skip
    """``read`` of one file of a run's artifacts: (its value, "") or (None, why not: none, or unreadable).

    A store that did not answer decides nothing (``unavailable``): ``outage(exc)`` is raised instead.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vit-run-file-", dir=scratch_root()) as tmp:
        try:
            local = download_run_artifact(cfg, run_id, path, tmp)
        except Exception as exc:  # an older run without it, or an outage
            if unavailable(exc):
                raise outage(exc) from exc
            return None, f"its run's {path} could not be downloaded ({type(exc).__name__})"
        try:
            return read(local), ""
        except Exception as exc:  # a damaged file: what it would say is unknown, not an error of this run
            return None, f"its run's {path} is unreadable ({' '.join(str(exc).split())[:200]})"


def experiment_id(cfg: PipelineConfig, c=None) -> str:
    """Gets or creates the config's experiment (one per dataset by default)."""
    c = c or client(cfg)
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


def unavailable(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a store that did not answer (``TrackingUnavailable``
    or ``vit_consumer.mlflow_store.unavailable``): a retry or ``--resume`` may then succeed. Decisions (a
    registry verdict, a gate that did not run) must not be made on an outage."""
    from vit_consumer.mlflow_store import unavailable as store_unavailable

    from vit_pipeline.errors import TrackingUnavailable

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TrackingUnavailable):
            return True
        seen = seen.__cause__ or seen.__context__
    return store_unavailable(exc)


def check_reachable(cfg: PipelineConfig) -> None:
    """Fails fast, before any training, if an HTTP tracking server does not answer.

    Retries for ``cfg.tracking.tracking_wait_seconds`` (a server that is just starting);
    MLflow's own client would otherwise retry each request for minutes.

    Raises:
        TrackingUnavailable: the server did not answer ``/health`` in time.
    """
    import time

    from vit_consumer.mlflow_store import health_problem

    from vit_pipeline.errors import TrackingUnavailable

    uri = tracking_uri(cfg)
    deadline = time.monotonic() + cfg.tracking.tracking_wait_seconds
    while (problem := health_problem(uri, timeout=5.0)) is not None:
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({problem}) after {cfg.tracking.tracking_wait_seconds:g} s; "
                "nothing was trained. Start it, or set --tracking-uri / MLFLOW_TRACKING_URI."
            )
        time.sleep(1.0)


def run_url(cfg: PipelineConfig, run_id: str) -> str:
    """A URL that opens the run in the MLflow UI.

    For a local store it assumes ``mlflow ui`` on its default port (README).
    """
    run = client(cfg).get_run(run_id)
    uri = tracking_uri(cfg)
    base = uri.rstrip("/") if not _is_local(uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def open_hint(cfg: PipelineConfig) -> str:
    """How to open ``run_url`` when no tracking server is running (a local store); else ""."""
    uri = tracking_uri(cfg)
    if not _is_local(uri):
        return ""
    return f"(no MLflow server runs for a local store; open it with: mlflow ui --backend-store-uri {uri})"


@dataclass(frozen=True)
class RunLogger:
    """Logs to one MLflow run: what every stage writes, through one client and one run id.

    MLflow's fluent "active run" is per thread and Prefect runs tasks in worker
    threads, so stages log through this explicit binding instead.
    """

    client: Any
    run_id: str

    @classmethod
    def open(cls, cfg: PipelineConfig, run_id: str) -> RunLogger:
        return cls(client(cfg), run_id)

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Logs numeric values (others are skipped) in batches of 1,000."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items() if _is_number(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def model_metrics(self, model_uri: str | None, values: dict[str, float]) -> None:
        """``values`` on the logged model ``models:/m-...`` of this run too (its page in the experiment's Models
        tab shows only what MLflow copied when it was logged); any other URI (or None): nothing."""
        if model_uri and model_uri.startswith("models:/m-"):
            for key, value in values.items():
                self.client.log_metric(
                    self.run_id, key, float(value), model_id=model_uri.removeprefix("models:/")
                )

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifacts(self, paths, artifact_dir: str) -> None:
        """Uploads local files into ``artifact_dir`` of the run."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def dict(self, value: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, value, artifact_file)

    def table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table (the run page's artifact view shows it as a grid)."""
        import pandas as pd

        self.client.log_table(self.run_id, pd.DataFrame(rows), artifact_file)

    def run(self):
        return self.client.get_run(self.run_id)

    def sync_epochs(self, epochs: dict[int, dict[str, float]]) -> list[int]:
        """Sends the epochs MLflow does not have yet; returns what was sent (0-based epoch indices).

        The step is the epoch's number as people count it (1 for the first): the one ``best_epoch``,
        the learning curves and the model card name. Used after the tracking server was away too:
        the epoch log on disk is the truth.
        """
        have = {m.step - 1 for m in self.client.get_metric_history(self.run_id, "loss")}
        missing = [e for e in sorted(epochs) if e not in have]
        for epoch in missing:
            self.metrics(epochs[epoch], step=epoch + 1)
        return missing


def server_up(cfg: PipelineConfig, timeout: float = 2.0) -> bool:
    """Quick health probe; local stores are always up."""
    from vit_consumer.mlflow_store import health_problem

    return health_problem(tracking_uri(cfg), timeout) is None


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
