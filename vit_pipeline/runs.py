"""An MLflow run's lifecycle, in one place, for every entry point.

What people read in the MLflow UI must be true:

* **RUNNING** from creation until the last stage has finished, and only while the
  process that owns the run is alive;
* **FINISHED** when the block of work returns;
* **FAILED** when it raises an ``Exception`` (the error goes to the tag
  ``vit_pipeline.error``);
* **KILLED** when it is interrupted (Ctrl-C, SIGTERM, a Prefect cancellation:
  any ``BaseException`` that is not an ``Exception``), and for a run whose owner
  died without a word (SIGKILL, a lost machine): the next ``vit-pipeline``
  command or flow run that opens the store finds it (``reap``) and marks it
  KILLED, with the reason in ``vit_pipeline.end_reason``.

A run that ends FAILED or KILLED, by itself or by a reaper, first withdraws the
promotion it made (``registry.withdraw_stopped``): a run that did not finish
leaves no model champion.

Ownership is recorded as run tags: ``vit_pipeline.owner.host``, ``.pid`` and
``.started`` (the process's start time, so a reused pid is not mistaken for the
owner). On the owner's host, a dead pid is certain; from another host a run is
taken for dead once its ``vit_pipeline.heartbeat`` tag (refreshed every
``HEARTBEAT_SECONDS`` by a daemon thread) is older than ``stale_seconds()``.

Everything goes through ``MlflowClient`` with explicit run ids: MLflow's fluent
"active run" is per thread, and its context manager ends the run on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from vit_pipeline import __version__, tracking
from vit_pipeline.config import SECTIONS, PipelineConfig

log = logging.getLogger(__name__)

OWNER_HOST = "vit_pipeline.owner.host"
OWNER_PID = "vit_pipeline.owner.pid"
OWNER_STARTED = "vit_pipeline.owner.started"
HEARTBEAT = "vit_pipeline.heartbeat"
ERROR = "vit_pipeline.error"
END_REASON = "vit_pipeline.end_reason"
PREVIOUS_END = "vit_pipeline.previous_end"  # how a resumed run ended before
RESUMED_COMMIT = "vit_pipeline.git.resumed_commit"  # the commit that continued a run begun by another
DIRTY = "vit_pipeline.git.dirty"  # "true": the checkout had uncommitted edits to tracked files
HEARTBEAT_SECONDS = 30.0
STALE_ENV = "VIT_PIPELINE_STALE_SECONDS"


def stale_seconds() -> float:
    """How old a heartbeat from another host may be before its run counts as dead (default 600 s)."""
    return float(os.environ.get(STALE_ENV, "600"))


def _started(pid: int) -> str | None:
    """The process's start time (seconds since the epoch, 2 decimals), None if it is gone."""
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def source_tags() -> dict[str, str]:
    """The code a run runs: the git commit of this package's checkout, its branch, and whether it had edits.

    MLflow records ``mlflow.source.git.commit`` (the "Git commit" of the run page) only from
    the fluent ``start_run`` and the entry script's folder, which for a Prefect worker or a
    console script is not the code that trains. None of these tags where the package is not
    in a git checkout (installed from a wheel: ``vit_pipeline.version`` says which).
    """
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from git import Repo  # GitPython, an MLflow dependency; raises ImportError without a git executable

        repo = Repo(here, search_parent_directories=True)
        # Installed into an ignored folder (a venv) or copied into an untracked one of some other checkout:
        # that checkout's commit is not this code's.
        if repo.ignored(here) or not repo.git.ls_files(here):
            return {}
        tags = {MLFLOW_GIT_COMMIT: repo.head.commit.hexsha,
                DIRTY: str(repo.is_dirty(untracked_files=False)).lower()}  # fmt: skip
        if not repo.head.is_detached:
            tags[MLFLOW_GIT_BRANCH] = repo.active_branch.name
        return tags
    except Exception as exc:  # no checkout, no git, a repository without commits: nothing to say
        log.debug("No git commit for %s: %s", here, exc)
        return {}


def owner_tags() -> dict[str, str]:
    """Tags that name this process as the run's owner."""
    pid = os.getpid()
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(pid),
        OWNER_STARTED: _started(pid) or "",
        HEARTBEAT: f"{time.time():.0f}",
    }


@dataclass(frozen=True)
class Liveness:
    """Whether a RUNNING run's owner is alive, and how we know."""

    alive: bool
    reason: str


def liveness(tags: dict[str, str], now: float | None = None, stale: float | None = None) -> Liveness:
    """Judges a RUNNING run's owner from its tags (see the module docstring); ``stale``: the heartbeat age
    from which an owner on another host counts as dead (default ``stale_seconds()``)."""
    host, pid = tags.get(OWNER_HOST), tags.get(OWNER_PID)
    if not host or not pid:
        return Liveness(True, "not owned by vit-pipeline")
    if host == socket.gethostname():
        started = _started(int(pid))
        if started is None:
            return Liveness(False, f"its process (pid {pid} on {host}) is gone")
        if tags.get(OWNER_STARTED) and started != tags[OWNER_STARTED]:
            return Liveness(
                False, f"its process (pid {pid} on {host}) is gone; the pid now belongs to another"
            )
        return Liveness(True, f"pid {pid} on {host} is alive")
    now = time.time() if now is None else now
    beat = float(tags.get(HEARTBEAT) or 0)
    if now - beat > (stale_seconds() if stale is None else stale):
        return Liveness(False, f"no heartbeat from pid {pid} on {host} for {now - beat:.0f} s")
    return Liveness(True, f"pid {pid} on {host} sent a heartbeat {now - beat:.0f} s ago")


def reap(client) -> list[str]:
    """Marks KILLED every RUNNING run whose owner is dead; returns their ids.

    Called whenever the pipeline opens a store, so a crash shows at the latest at
    the next command. Runs not created by vit-pipeline are left alone.
    """
    killed = []
    for run in running_runs(client):
        verdict = liveness(run.data.tags)
        if verdict.alive:
            continue
        reason = f"Marked KILLED by pid {os.getpid()} on {socket.gethostname()}: {verdict.reason}"
        if end_run(client, run.info.run_id, "KILLED", reason):
            killed.append(run.info.run_id)
    return killed


def running_runs(client, where: str = "") -> list:
    """The RUNNING runs of every active experiment of the store (``where``: more of the filter, ``and``-ed)."""
    return find_runs(client, f"attributes.status = 'RUNNING'{f' and {where}' if where else ''}")


def find_runs(client, filter_string: str) -> list:
    """The runs of every active experiment of the store that ``filter_string`` selects."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    found = []
    for start in range(0, len(experiments), 100):  # search_runs takes a bounded list
        found += client.search_runs(
            experiments[start : start + 100], max_results=1000, filter_string=filter_string
        )
    return found


def end_run(client, run_id: str, status: str, reason: str) -> bool:
    """Ends a run that its owner cannot end any more, with the reason as ``vit_pipeline.end_reason``; first,
    as for a run that stops itself (``_end``), the promotion it made is withdrawn: a SIGKILL after the
    registration (in the model card) left a KILLED run's model champion.

    Returns False, the run left RUNNING for the next pass, where the withdrawal failed (the registry lock not
    had in time, the store away): ended KILLED, nothing would ever try again and its model would stay champion.
    """
    from vit_pipeline.registry import withdraw_stopped

    if not withdraw_stopped(client, None, run_id, reason):
        log.warning("Run %s left RUNNING: the promotion it made could not be withdrawn (above); the next command "
                    "that opens the store tries again", run_id)  # fmt: skip
        return False
    client.set_tag(run_id, END_REASON, reason[:5000])
    client.set_terminated(run_id, status)
    log.warning("Run %s: %s", run_id, reason)
    return True


def create_run(cfg: PipelineConfig, preset: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Creates a run in the config's experiment, logs every config value; returns its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    tracking.check_reachable(cfg)
    c = tracking.client(cfg)
    reap_once(cfg)
    exp_id = tracking.experiment_id(cfg, c)
    all_tags = {
        "vit_pipeline.version": __version__,
        "dataset": cfg.dataset_tag,
        **source_tags(),
        **(tags or {}),
    }
    if cfg.tracking.run_name:
        all_tags[MLFLOW_RUN_NAME] = cfg.tracking.run_name
    run = c.create_run(exp_id, run_name=cfg.tracking.run_name, tags={**all_tags, **owner_tags()})
    logger = tracking.RunLogger(c, run.info.run_id)
    logger.params(tracking.config_params(cfg, preset))
    logger.tags({"mlflow.note.content": _note(cfg, preset)})
    return logger.run_id


COMMAND_TAG = "vit_pipeline.command"  # which command started a run (none: the pipeline flow)
RESUMABLE = (None, "train", "evaluate")  # the commands whose runs --resume continues (by the same command)


def resume_run(cfg: PipelineConfig, run_id: str, command: str | None = None) -> str:
    """Checks that ``run_id`` may be continued after a crash with ``cfg``, by the command that started it
    (``command``: its ``vit_pipeline.command`` tag; None: the pipeline flow's runs, which have none).

    A run whose owner died is first marked KILLED (``reap``); one whose owner
    is still alive is refused. ``lifecycle`` then sets it RUNNING again.

    Raises:
        ConfigError: unknown run, a FINISHED one, one another command started (or one never resumed: a
            sweep's), or a config value that differs from the run's.
        TrainingInProgress: the run's owner process is alive.
    """
    from mlflow.exceptions import MlflowException

    from vit_pipeline.errors import ConfigError, TrainingInProgress

    tracking.check_reachable(cfg)
    c = tracking.client(cfg)
    reap_once(cfg)
    try:
        run = c.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"Cannot resume: no MLflow run {run_id!r} at {tracking.tracking_uri(cfg)}") from exc
    started_by = run.data.tags.get(COMMAND_TAG)
    if started_by not in RESUMABLE:  # a sweep's runs, a benchmark: started again, never continued
        raise ConfigError(f"Cannot resume run {run_id}: `{started_by}` runs are not resumed; run it again")
    # The pipeline may finish what `train` started (the rest of its stages too); `train --resume` of a pipeline
    # run FINISHED it without its later stages, and an evaluate run became a training run.
    if started_by != command and (command, started_by) != (None, "train"):

        def name(c: str | None) -> str:
            return f"vit-pipeline {c}" if c else "the pipeline (vit-pipeline run, a deployment)"

        raise ConfigError(f"Cannot resume run {run_id} with {name(command)}: {name(started_by)} started it; "
                          "resume it the same way")  # fmt: skip
    logged = run.data.params
    for key, value in tracking.config_params(cfg).items():
        if key in logged and logged[key] != value and not _operational(key):
            raise ConfigError(
                f"Cannot resume run {run_id}: {key} differs. Received: {key}={value}, run has {logged[key]}"
            )
    if run.info.status == "RUNNING" and (verdict := liveness(run.data.tags)).alive:
        raise TrainingInProgress(f"Cannot resume run {run_id}: it is RUNNING ({verdict.reason})")
    if run.info.status == "FINISHED":  # reopening it would rewrite a finished record (and a champion's run)
        raise ConfigError(f"Cannot resume run {run_id}: it FINISHED; --resume continues a run that crashed, "
                          "failed or was killed. Start a new run instead")  # fmt: skip
    return run_id


_reaped: set[str] = set()


def reap_once(cfg: PipelineConfig) -> list[str]:
    """``reap`` the first time this process opens a store (a warning if it cannot)."""
    uri = tracking.tracking_uri(cfg)
    if uri in _reaped:
        return []
    _reaped.add(uri)
    try:
        return reap(tracking.client(cfg))
    except Exception as exc:  # never block the caller's own work on it
        log.warning("Could not check %s for runs of dead processes: %s", uri, exc)
        return []


def _operational(field: str) -> bool:
    """Fields that may change between a crash and its resume (they do not touch the model)."""
    # distribution_strategy too: a run may resume on a machine with other devices.
    # Fields that do not change what is trained: a resume may set them anew (export candidates too).
    operational = ("tracking_uri", "tracking_wait_seconds", "run_name", "distribution_strategy",
                   "system_metrics_seconds", "serve_candidates", "candidate_min_agreement", "candidate_images",
                   "int8_calibration_images", "serve_gate_images")  # fmt: skip
    # The gates judge a model and its data; they never change what is trained.
    return field in operational or any(field in SECTIONS[s].model_fields for s in ("benchmark", "gates"))


def _note(cfg: PipelineConfig, preset: str | None) -> str:
    return (
        f"ViT on `{cfg.dataset_tag}` (preset `{preset or 'custom'}`): image {cfg.image_size}, "
        f"patch {cfg.patch_size}, dim {cfg.projection_dim}, {cfg.transformer_layers} blocks, "
        f"{cfg.epochs} epochs."
    )


class _Heartbeat(threading.Thread):
    """Refreshes the run's heartbeat tag until stopped; a tracking server that is away is skipped."""

    def __init__(self, client, run_id: str, interval: float):
        super().__init__(name=f"mlflow-heartbeat-{run_id[:8]}", daemon=True)
        self.client, self.run_id, self.interval = client, run_id, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}")
            except Exception as exc:  # the epoch log on disk is the truth; keep going
                log.debug("Heartbeat for %s failed: %s", self.run_id, exc)


def status_for(exc: BaseException | None) -> str:
    """FINISHED, FAILED (an error) or KILLED (an interruption) for how a block ended."""
    if exc is None:
        return "FINISHED"
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


@contextlib.contextmanager
def lifecycle(
    cfg: PipelineConfig, run_id: str, heartbeat_seconds: float = HEARTBEAT_SECONDS
) -> Iterator[str]:
    """Owns ``run_id`` for the block: RUNNING inside, then FINISHED, FAILED or KILLED (a run that ends FAILED or
    KILLED first withdraws the promotion it made: ``registry.withdraw_stopped``).

    The end status is set even when the tracking server is away at that moment
    (with a warning): the run then stays RUNNING there until ``reap`` or
    ``--resume`` settles it, never FINISHED by mistake.
    """
    client = tracking.client(cfg)
    _claim(client, run_id)
    beat = _Heartbeat(client, run_id, heartbeat_seconds)
    beat.start()
    monitor = None
    error: BaseException | None = None
    try:
        monitor = _system_metrics(cfg, run_id)  # inside: a monitor that fails to start still ends the run
        yield run_id
    except BaseException as exc:
        error = exc
        raise
    finally:
        beat.stopped.set()
        with _stops_held(error) if error is not None else contextlib.nullcontext():
            try:
                if monitor is not None:
                    monitor.finish()  # flushes the last samples while the run is still RUNNING
            finally:
                _end(cfg, client, run_id, error)


def _system_metrics(cfg: PipelineConfig, run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU through NVML where one exists)
    for this run, sampled every ``cfg.tracking.system_metrics_seconds`` (0: off): the run page's
    "System metrics" tab. A resumed run continues the step count."""
    if cfg.tracking.system_metrics_seconds <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Started monitoring" lines
    monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_seconds, resume_logging=True,
                                   tracking_uri=tracking.tracking_uri(cfg))  # fmt: skip
    monitor.start()
    return monitor


def _claim(client, run_id: str) -> None:
    """This process owns the run from now on; a resumed run's old end is kept as history."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = client.get_run(run_id).data.tags
    ended = {k: tags[k] for k in (ERROR, END_REASON) if k in tags}
    history = {PREVIOUS_END: "; ".join(ended.values())[:5000]} if ended else {}
    # A run resumed by other code than started it says so: its weights came from both. (Only a run that
    # ended before is resumed; a new one was tagged by create_run in this process a moment ago.)
    if ended and (now := source_tags().get(MLFLOW_GIT_COMMIT)) and now != tags.get(MLFLOW_GIT_COMMIT, now):
        history[RESUMED_COMMIT] = now
    client.log_batch(run_id, tags=_run_tags({**owner_tags(), **history}))
    for key in ended:
        client.delete_tag(run_id, key)
    client.update_run(run_id, status="RUNNING")


def recent(client, experiment_names: list[str] | None = None, limit: int = 20) -> list[dict[str, str]]:
    """The newest runs (all experiments, or the named ones) as rows for people: status, owner, why it ended."""
    from mlflow.entities import ViewType

    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
                   if not experiment_names or e.name in experiment_names}  # fmt: skip
    if not experiments:
        return []
    found = client.search_runs(list(experiments), order_by=["attributes.start_time DESC"], max_results=limit)
    rows = []
    for run in found:
        tags = run.data.tags
        owner = f"pid {tags[OWNER_PID]} on {tags[OWNER_HOST]}" if OWNER_PID in tags else ""
        rows.append({"run_id": run.info.run_id, "experiment": experiments[run.info.experiment_id],
                     "name": run.info.run_name or "", "status": run.info.status, "owner": owner,
                     "ended": tags.get(ERROR) or tags.get(END_REASON) or ""})  # fmt: skip
    return rows


def what_ended(error: BaseException) -> str:
    """The run's end as people read it: the error's type and message, or the signal that stopped it (a
    cancelled flow run's TerminationSignal said nothing but its number)."""
    import signal

    name, text = type(error).__name__, " ".join(str(error).split())
    number = getattr(error, "signal", None)
    if isinstance(number, int):
        try:
            sent = signal.Signals(number).name
        except ValueError:
            sent = f"signal {number}"
        return f"{name}: stopped by {sent} (a cancelled flow run, or its worker or service stopped)"
    if isinstance(error, KeyboardInterrupt) and not text:
        return f"{name}: interrupted (Ctrl-C or SIGINT)"
    return f"{name}: {text}" if text else name


def _end(cfg: PipelineConfig, client, run_id: str, error: BaseException | None) -> None:
    """The run's end: FINISHED, or FAILED/KILLED with its cause and, first, its promotion withdrawn (a run
    that did not finish leaves no model champion: ``registry.withdraw_stopped``)."""
    status = status_for(error)
    try:
        if error is not None:
            from vit_pipeline.registry import withdraw_stopped

            withdraw_stopped(client, cfg.resolved_model_name, run_id, what_ended(error))
            key = ERROR if status == "FAILED" else END_REASON
            client.set_tag(run_id, key, what_ended(error)[:5000])
        client.set_terminated(run_id, status)
    except Exception as exc:  # MLflow raises several types for connection errors
        log.warning("Could not mark run %s %s: %s", run_id, status, exc)


@contextlib.contextmanager
def _stops_held(error: BaseException) -> Iterator[None]:
    """While a stopped run is being ended (its last system metrics, its promotion withdrawn, its status), the
    first Ctrl-C or SIGTERM waits: impatient users press Ctrl-C twice, and the second left the run RUNNING or
    its promotion half-withdrawn. Another one stops at once (the end can wait minutes on a tracking server
    that is away). A held signal is delivered afterwards when the run ended on an error, not a stop: a SIGTERM
    then still exits 143. Python runs signal handlers in the main thread only, so only there are they held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handlers = {s: h for s, h in handlers.items() if h is not None}  # None: not Python's to set back

    def restore() -> None:
        for number, handler in handlers.items():
            signal.signal(number, handler)

    def deliver(signum: int) -> None:
        """What the signal would have done: its Python handler (raises), else the OS default (ends the process)."""
        if callable(handler := handlers[signum]):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)

    def hold(signum: int, frame) -> None:
        held.append(signum)
        if len(held) > 1:  # asked twice: the original handler, now
            restore()
            deliver(signum)
            return
        log.warning("%s: ending the run first (send it again to stop at once)", signal.Signals(signum).name)

    for number in handlers:
        signal.signal(number, hold)
    try:
        yield
    finally:
        restore()
        if len(held) == 1 and isinstance(error, Exception):  # (two: delivered already)
            deliver(held[0])


def _run_tags(tags: dict[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


@contextlib.contextmanager
def tracked_run(
    cfg: PipelineConfig,
    preset: str | None = None,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """A new run (or ``resume_run_id`` reopened) under ``lifecycle``; yields its id.

    The one way every entry point (CLI, flows, sweep trials, benchmarks) opens a
    run. A resumed run gets ``tags`` too (e.g. the new Prefect flow run's link).
    """
    if resume_run_id:
        run_id = resume_run(cfg, resume_run_id, (tags or {}).get(COMMAND_TAG))
        if tags:
            tracking.client(cfg).log_batch(run_id, tags=_run_tags(tags))
    else:
        run_id = create_run(cfg, preset, tags)
    with lifecycle(cfg, run_id):
        yield run_id


def flow_run_config(parameters: dict | None) -> PipelineConfig:
    """The tracking settings of a Prefect flow run of this project, from its parameters.

    Only the tracking fields matter to whoever ends its runs: no checkpoint is fetched
    again (``init_from`` is dropped), and a parameter this code does not know is ignored.
    """
    from vit_pipeline.config import PRESETS, make_config

    params = parameters or {}
    overrides = {k: v for k, v in dict(params.get("overrides") or {}).items() if k != "init_from"}
    config = {k: v for k, v in dict(params.get("config") or {}).items() if k != "init_from"}
    preset = params.get("preset") if params.get("preset") in PRESETS else "quickstart"
    if params.get("tracking_uri") and "tracking_uri" not in {**overrides, **config}:  # benchmark-champion's
        overrides["tracking_uri"] = params["tracking_uri"]
    return make_config(preset, overrides, config)


FLOW_CRASH_STALE_SECONDS = 2 * HEARTBEAT_SECONDS  # a crashed flow run's owner on another host: dead past this


def mark_flow_run_killed(cfg: PipelineConfig, flow_run_id: str, reason: str) -> list[str]:
    """Marks KILLED the RUNNING MLflow runs linked to a Prefect flow run whose owner is dead (any active
    experiment of the store): those tagged with its id, and their child runs.

    Prefect's verdict comes from missing flow-run heartbeats; the owner may still be alive (a flow run
    whose heartbeat period is longer than the automation's): a living run is never ended. An owner on
    another host is judged by its MLflow heartbeat (every 30 s): a fresh one is watched until it is
    ``FLOW_CRASH_STALE_SECONDS`` old - a container killed a moment ago still has a recent heartbeat.
    """
    client = tracking.client(cfg)
    killed = []
    own = find_runs(client, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    linked = [run for run in own if run.info.status == "RUNNING"]
    # And the runs its runs started as children, whatever state their parent is in now: a sweep's trials run
    # in Dask workers and carry only mlflow.parentRunId (they stayed RUNNING when the sweep's host was lost).
    for parent in own:
        linked += running_runs(client, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for run in linked:
        verdict = _crashed_owner(client, run.info.run_id, run.data.tags)
        if verdict.alive:
            log.warning("Run %s left RUNNING although its flow run %s crashed: %s", run.info.run_id, flow_run_id,
                        verdict.reason)  # fmt: skip
            continue
        if end_run(client, run.info.run_id, "KILLED", f"{reason} ({verdict.reason})"):
            killed.append(run.info.run_id)
    return killed


def _crashed_owner(client, run_id: str, tags: dict[str, str]) -> Liveness:
    verdict = liveness(tags, stale=FLOW_CRASH_STALE_SECONDS)
    if not verdict.alive or tags.get(OWNER_HOST) in (None, socket.gethostname()) or not tags.get(OWNER_PID):
        return verdict  # dead, or judged by its pid on this host, or not ours
    beat = float(tags.get(HEARTBEAT) or 0)
    time.sleep(max(0.0, beat + FLOW_CRASH_STALE_SECONDS + 1 - time.time()))
    now = client.get_run(run_id).data.tags
    if float(now.get(HEARTBEAT) or 0) > beat:
        return Liveness(True, f"pid {tags[OWNER_PID]} on {tags[OWNER_HOST]} sent a heartbeat after the crash")
    return liveness(now, stale=FLOW_CRASH_STALE_SECONDS)
