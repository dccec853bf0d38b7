"""The ``vit-pipeline`` command line.

Every config field is an option (``--patch-size 4``, ``--mlp-head-units 2048,1024``,
``--data-path none``) on top of ``--preset``. Problems with input are reported as
one line on stderr with a non-zero exit; the full traceback goes to the log file
under ``$VIT_PIPELINE_HOME/logs``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
import yaml
from vit_consumer import contract

from vit_pipeline import __version__
from vit_pipeline.config import PRESETS, field_description, field_metavar, field_names, make_config
from vit_pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("vit_pipeline")
# Full tracebacks of CLI errors: to the log file only (the terminal gets one line). Prefect puts a
# console handler on the root logger, so this logger must not propagate.
trace_log = logging.getLogger("vit_pipeline.cli.traceback")
trace_log.propagate = False


def _config_options(func: Callable) -> Callable:
    """Adds ``--preset`` and one option per config field, described by the field itself.

    Values stay text here: the config model parses and checks them, so a bad value gets
    the same one-line message from the CLI, a flow parameter or a sweep file.
    """
    for name in reversed(field_names()):
        func = click.option(
            f"--{name.replace('_', '-')}",
            name,
            default=None,
            metavar=field_metavar(name),
            help=field_description(name),
        )(func)
    return click.option(
        "--preset",
        default="quickstart",
        show_default=True,
        help=f"Named preset: {', '.join(PRESETS)}.",
    )(func)


def _split_config(kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    preset = kwargs.pop("preset")
    overrides = {k: kwargs.pop(k) for k in field_names() if kwargs.get(k) is not None}
    for k in field_names():
        kwargs.pop(k, None)
    return preset, overrides


def _setup_logging() -> str:
    """Sends this package's log (and tracebacks) to a file; leaves Prefect's alone."""
    from vit_pipeline.tracking import home

    logs = home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / "vit-pipeline.log"
    for logger in (log, trace_log):
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            if old.baseFilename != str(path.resolve()):  # another home in the same process
                logger.removeHandler(old)
                old.close()
    handler = next((h for h in log.handlers if isinstance(h, logging.FileHandler)), None)
    if handler is None:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) for h in trace_log.handlers):
        trace_log.addHandler(handler)
    return str(path)


def _quiet_telemetry() -> None:
    """No network here: keep Prefect's usage pings from trying (MLflow's: ``progress.quiet_libraries``)."""
    for var in ("PREFECT_SERVER_ANALYTICS_ENABLED",):
        os.environ.setdefault(var, "false")
    # Prefect gives its temporary API server 20 s to start; a busy 2-core machine needs more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The heartbeat period the zombie automation expects (Prefect's default is 180 s): a CLI run against a
    # server with the automation was marked Crashed while it trained.
    from vit_pipeline.zombies import HEARTBEAT_SECONDS

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))


def _prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "(the temporary server)"


def _friendly_errors(func: Callable) -> Callable:
    """One line on stderr and exit 2 (bad config) or 1 (other input) instead of a trace; 130 on Ctrl-C, 143 on
    SIGTERM."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            log_path = _setup_logging()
        except OSError as exc:  # the home is a file, read-only, or under one: nowhere to log either
            from vit_pipeline.tracking import home

            click.echo(f"Error: cannot write under VIT_PIPELINE_HOME={home()}: {exc}", err=True)
            sys.exit(1)
        _quiet_telemetry()
        try:
            try:
                return func(*args, **kwargs)
            except RuntimeError as exc:  # Prefect's own, untyped: no API server to talk to
                if "ephemeral Prefect API server" in str(exc):  # its temporary one did not start
                    raise PipelineError(
                        f"{exc} Start one (`prefect server start`) and set PREFECT_API_URL, or raise "
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
                    ) from exc
                # PREFECT_API_URL names a server that does not answer.
                if "Failed to reach API at" in str(exc):
                    raise PipelineError(
                        f"{exc.args[0] if exc.args else exc} Is the Prefect server (PREFECT_API_URL) running? "
                        "Unset PREFECT_API_URL to run with a temporary one"
                    ) from exc
                raise
            # A Prefect API read directly (automations).
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise PipelineError(
                    f"Cannot reach the Prefect API at {_prefect_api()}: {exc}. Is the Prefect server running?"
                ) from exc
        except KeyboardInterrupt:
            # Click's own handling says "Aborted!" and exits 1, which scripts read as a failure of the work;
            # the shells' convention for Ctrl-C (SIGINT) is 128 + 2. The run itself has ended KILLED by now.
            click.echo("Interrupted", err=True)
            _exit_even_if_a_thread_hangs(128 + signal.SIGINT)
        except SystemExit as exc:
            if exc.code == 128 + signal.SIGTERM:  # _raise_system_exit's
                _exit_even_if_a_thread_hangs(exc.code)
            raise
        except Exception as exc:
            # Ours; the file system's (a home that is a file, a read-only folder); MLflow's (a malformed
            # tracking URI, a name it refuses): one line each, the trace in the log. Anything else is a bug.
            if not isinstance(exc, PipelineError | OSError) and not type(exc).__module__.startswith("mlflow"):
                raise
            trace_log.exception("vit-pipeline failed")
            text = " ".join(str(exc).split())[:1000] or type(exc).__name__
            click.echo(f"Error: {text}", err=True)
            click.echo(f"(details: {log_path})", err=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="vit-pipeline")
def main() -> None:
    """Train, evaluate, export and serve a Vision Transformer."""
    from vit_pipeline.distribute import LOGICAL_CPUS_ENV
    from vit_pipeline.progress import quiet_libraries

    quiet_libraries()
    _exit_cleanly_on_sigterm()

    if os.environ.get(LOGICAL_CPUS_ENV):  # must happen before any stage starts TensorFlow
        from vit_pipeline.distribute import configure_logical_cpus

        try:
            configure_logical_cpus()
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None


EXIT_WATCHDOG_SECONDS = 60.0


def _exit_even_if_a_thread_hangs(code: int) -> NoReturn:
    """``sys.exit(code)`` after a stop, with a watchdog: if the interpreter's shutdown has not ended within
    ``EXIT_WATCHDOG_SECONDS`` (it waits for every non-daemon thread), the process exits anyway.

    A Ctrl-C that lands inside a thread pool's bookkeeping (MLflow's artifact uploads) can leave a worker
    thread waiting for work that never comes: the command printed "Interrupted" and then hung for good, the
    temporary Prefect server with it (it stops at this process's end, by its parent-death signal too).
    """

    def watchdog() -> None:
        time.sleep(EXIT_WATCHDOG_SECONDS)
        sys.stderr.write(f"vit-pipeline: a thread was still running {EXIT_WATCHDOG_SECONDS:g} s after the stop; "
                         "exiting without it\n")  # fmt: skip
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()
    sys.exit(code)


def _raise_system_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a process manager, ``kill``, ``docker stop``) ends the command as Ctrl-C would: cleanly.

    Python's default ends the process at once, with no ``finally`` and no ``atexit``: the temporary
    Prefect server a flow starts without ``PREFECT_API_URL`` (a child process, stopped ``atexit``) then
    outlives it. Prefect's flow engine turns SIGTERM into its own exception, ends the flow run, and then
    sends the signal again to the handler it found (``prefect.utilities.engine.capture_sigterm``): this
    one, which exits with 143 through every clean-up. The MLflow run ends KILLED either way.
    """
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _start_temporary_prefect_server() -> None:
    """Starts the temporary Prefect API server a flow needs (no ``PREFECT_API_URL``) in a session of its own.

    Ctrl-C at a terminal sends SIGINT to the whole foreground process group. Prefect starts its temporary
    server lazily as a plain child, in that group: the server died first, the flow could not report its
    end (its client retried for minutes) and the flow run stayed RUNNING in Prefect's database. In a
    session of its own the server gets no Ctrl-C: the flow reports its end, and the server stops when this
    process exits (Prefect's ``atexit``), or, on Linux, when it is killed (SIGKILL runs no ``atexit``: the
    parent-death signal, tied to the thread that forks, which is why the main thread starts it here).

    Prefect finds its temporary server by port in ``SubprocessASGIServer._instances`` (the default port
    is ``None``): a started subclass registered there is the one its client uses.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return  # a server of the user's, or none allowed: Prefect's own rules apply
    import subprocess

    from prefect.server.api.server import SubprocessASGIServer

    from vit_pipeline.fsutil import own_session_ended_with_parent

    class _OwnSessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            popen = subprocess.Popen
            subprocess.Popen = functools.partial(popen, preexec_fn=own_session_ended_with_parent())
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    if sys.platform.startswith("linux") and None not in SubprocessASGIServer._instances:
        _OwnSessionServer().start()


@main.command("config")
@_config_options
@_friendly_errors
def show_config(**kwargs) -> None:
    """Print the resolved, validated config as JSON."""
    preset, overrides = _split_config(kwargs)
    click.echo(make_config(preset, overrides).to_json())


def _run_id(ctx, param, value: str | None) -> str | None:
    """A blank --resume started a fresh run without a word (a shell variable that was empty)."""
    if value is not None and not value.strip():
        raise click.BadParameter("expected an MLflow run id. Received: ''", ctx, param)
    return value


_resume_option = click.option(
    "--resume", "resume_run_id", default=None, metavar="RUN_ID", callback=_run_id,
    help="Continue a crashed MLflow run from its last finished epoch (same options).",
)  # fmt: skip


@main.command()
@_config_options
@_resume_option
@_friendly_errors
def run(resume_run_id: str | None, **kwargs) -> None:
    """Run the whole pipeline as a Prefect flow (data, train, evaluate, export, benchmark, register, card)."""
    from vit_pipeline.config import ConfigOverrides
    from vit_pipeline.data import check_source

    preset, overrides = _split_config(kwargs)
    check_source(
        make_config(preset, overrides)
    )  # bad config, paths, archives: before Prefect or TensorFlow start
    from vit_pipeline.flows.train_pipeline import train_pipeline

    _start_temporary_prefect_server()
    with console_without_tracebacks():
        result = train_pipeline(
            preset=preset, config=ConfigOverrides(**overrides), resume_run_id=resume_run_id
        )
    click.echo(json.dumps(result, indent=2))


class _NoTraceback(logging.Formatter):
    """Formats like the wrapped formatter, without exception tracebacks (one line per record)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            text = self.inner.format(record)
            # Errors may carry a formatted traceback in the message itself: keep their first line.
            return text.splitlines()[0] if record.levelno >= logging.ERROR and text else text
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextlib.contextmanager
def console_without_tracebacks():
    """Prefect's terminal output without tracebacks while a flow runs from the CLI.

    A failing task still fails the flow run, and the Prefect UI (the API log
    handler) and our log file keep the full traceback; the terminal gets
    Prefect's progress lines and our one ``Error:`` line with the log path.
    """
    names = ["", *(n for n in logging.Logger.manager.loggerDict if n.startswith("prefect"))]
    handlers = {h for n in names for h in logging.getLogger(n).handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}  # fmt: skip
    saved = {h: h.formatter for h in handlers}
    for h in handlers:
        h.setFormatter(_NoTraceback(h.formatter))
        h.addFilter(_prefect_errors)
    try:
        yield
    finally:
        for h, formatter in saved.items():
            h.setFormatter(formatter)
            h.removeFilter(_prefect_errors)


def _prefect_errors(record: logging.LogRecord) -> bool:
    """Drops Prefect's ERROR records (a failed task, the failed flow) from the terminal: they
    repeat the error our ``Error:`` line states; the Prefect UI keeps them with tracebacks."""
    return not (record.levelno >= logging.ERROR and record.name.startswith("prefect"))


@main.command("proxy-experiment")
@click.option("--data-path", default=None, help="Local CIFAR-100 copy (default: download through Keras).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--experiment-name", default="vit-cifar100-proxy", show_default=True)
@click.option("--report-dir", default="docs/experiments/proxy", show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: the local SQLite store).")
@click.option("--preset", "presets", multiple=True, default=("cifar100", "cifar100-improved"), show_default=True,
              type=click.Choice(list(PRESETS)), help="Presets to compare (repeat the option).")  # fmt: skip
@_friendly_errors
def proxy_experiment(data_path, epochs, seed, experiment_name, report_dir, tracking_uri, presets) -> None:
    """Train presets (default: the seed and the improved one) alike and compare them (table + curves)."""
    _check_writable(str(Path(report_dir) / "table.md"))  # before training (it was found after it)
    overrides = {"tracking_uri": tracking_uri} if tracking_uri else {}
    shared = {"data_path": data_path, "epochs": epochs, "seed": seed, "experiment_name": experiment_name}
    from vit_pipeline.data import check_source

    for preset in presets:  # a bad value fails before Prefect or TensorFlow start
        cfg = make_config(preset, {**shared, **overrides})
    check_source(cfg)  # and a bad path or archive (one data source for every preset)
    from vit_pipeline.flows.proxy_experiment import proxy_experiment as flow

    _start_temporary_prefect_server()
    with console_without_tracebacks():
        report = flow(data_path=data_path, epochs=epochs, seed=seed, experiment_name=experiment_name,
                      report_dir=report_dir, presets=tuple(presets), overrides=overrides)  # fmt: skip
    click.echo(json.dumps(report, indent=2))


# Fields of the pre-training that transfer-experiment sets itself (the split, the budget, the store).
PRETRAIN_FIXED = frozenset({"dataset", "data_path", "dataset_name", "epochs", "seed", "run_name", "init_from",
                            "experiment_name", "tracking_uri"})  # fmt: skip


class FiniteRange(click.FloatRange):
    """click's FloatRange that also refuses nan and inf: both passed its bounds (nan compares false), and
    ``benchmark --seconds inf`` ran for ever, ``--seconds nan`` measured nothing and exited 0."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _field_values(ctx, param, values: tuple[str, ...]) -> dict[str, Any]:
    """``FIELD=VALUE`` options as config overrides, each value read as YAML (``2``, ``0.25``, ``[1, 64]``)."""
    out: dict[str, Any] = {}
    for item in values:
        field, sep, raw = item.partition("=")
        if not sep or not field.strip():
            raise click.BadParameter(f"Expected FIELD=VALUE. Received: {item!r}", ctx, param)
        try:
            out[field.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise click.BadParameter(f"Could not read the value of {item!r}: {reason}", ctx, param) from None
    return out


@main.command("transfer-experiment")
@click.option("--data-path", required=True, help="CIFAR-100 copy (cifar-100-python folder or .tar.gz).")
@click.option(
    "--source", default=None, help="Checkpoint to fine-tune from (any --init-from); default: pre-train one."
)
@click.option(
    "--target-folder", default=None, help="Your own target image folder (default: held-out classes)."
)
@click.option(
    "--pretrain-preset",
    default="cifar100-improved-light",
    show_default=True,
    type=click.Choice(list(PRESETS)),
)
@click.option("--pretrain-epochs", default=15, show_default=True, type=click.IntRange(1))
@click.option("--pretrain-set", "pretrain_overrides", multiple=True, metavar="FIELD=VALUE", callback=_field_values,
              help="A config field of the pre-training only (repeatable), e.g. --pretrain-set rand_augment_ops=2.")  # fmt: skip
@click.option("--seed-preset", default="cifar100", show_default=True, type=click.Choice(list(PRESETS)))
@click.option("--time-budget-minutes", default=None, type=FiniteRange(min=0, min_open=True),
              help="Also train each approach for about this long: time-to-accuracy at 5, 10, 30 min.")  # fmt: skip
@click.option(
    "--epochs", default=30, show_default=True, type=click.IntRange(1), help="Epochs of both target runs."
)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option(
    "--split-seed", default=0, show_default=True, type=int, help="Seed of the target classes and images."
)
@click.option("--target-classes", default=10, show_default=True, type=click.IntRange(1))
@click.option("--train-per-class", default=50, show_default=True, type=click.IntRange(1))
@click.option(
    "--work-dir", default="vit-runs/transfer", show_default=True, help="Where the split folders go."
)
@click.option("--experiment-name", default="vit-transfer", show_default=True)
@click.option("--report-dir", default="docs/experiments/transfer", show_default=True)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: the local SQLite store).")
@_friendly_errors
def transfer_experiment(**options) -> None:
    """Fine-tune from a model pre-trained on other classes vs the same budget from scratch (table + curves)."""
    _check_writable(str(Path(options["report_dir"]) / "table.md"))  # before training (it was found after it)
    if options["pretrain_overrides"]:  # a field or value the config refuses fails here, before any training
        if options["source"]:
            raise ConfigError("--pretrain-set has no effect with --source: nothing is pre-trained")
        fixed = sorted(set(options["pretrain_overrides"]) & PRETRAIN_FIXED)
        if fixed:
            raise ConfigError(
                f"--pretrain-set cannot set {', '.join(fixed)}: the experiment sets it "
                "(--data-path, --pretrain-epochs, --seed, --experiment-name, --tracking-uri)"
            )
        make_config(options["pretrain_preset"], options["pretrain_overrides"])
    if options["source"]:  # a checkpoint that cannot be used fails here, before any training
        make_config("finetune", {"init_from": options["source"], "tracking_uri": options["tracking_uri"]})
    from vit_pipeline.data import check_source

    # The CIFAR-100 copy and the target folder, before any training (a missing folder failed after the split
    # had written thousands of images).
    check_source(make_config("cifar100", {"data_path": options["data_path"]}))
    if options.get("target_folder"):
        check_source(
            make_config("quickstart", {"dataset": "image_folder", "data_path": options["target_folder"]})
        )
    from vit_pipeline.flows.transfer_experiment import transfer_experiment as flow

    _start_temporary_prefect_server()
    with console_without_tracebacks():
        result = flow(**options)
    click.echo(json.dumps(result, indent=2, default=str))


@main.command()
@click.option("--heartbeat-seconds", default=60, show_default=True, type=click.IntRange(30),
              help="The deployments' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (prefect.yaml).")  # fmt: skip
@click.option("--missed", default=2, show_default=True, type=click.IntRange(1),
              help="Heartbeats a flow run may miss before it is marked Crashed.")  # fmt: skip
@_friendly_errors
def automations(heartbeat_seconds, missed) -> None:
    """Create Prefect's zombie-flow-run automation and the one that ends crashed runs' MLflow runs KILLED.

    Needs PREFECT_API_URL (a real server) and the deployments of prefect.yaml (the
    ``end-crashed-runs`` one): ``deploy/local.sh deploy`` runs it after deploying.
    """
    from prefect.settings import get_current_settings

    from vit_pipeline import zombies

    if not get_current_settings().api.url:
        raise ConfigError(
            "PREFECT_API_URL is not set: automations belong on the Prefect server the workers use"
        )
    try:
        created = zombies.ensure_automations(heartbeat_seconds, missed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    click.echo(json.dumps(created, indent=2))


@main.command()
@click.argument("space_path", type=click.Path(dir_okay=False))
@click.option("--dask-address", default=None, metavar="tcp://HOST:PORT",
              help="Scheduler of an existing Dask cluster (default: a local cluster).")  # fmt: skip
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1),
              help="Worker processes of the local cluster (one trial each at a time).")  # fmt: skip
@click.option("--gpus-per-trial", default=None, type=FiniteRange(0),
              help="GPUs each trial asks for (default: 1 when the cluster has GPUs).")  # fmt: skip
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: the local SQLite store).")
@click.option("--data-path", default=None, help="Local dataset copy for every trial.")
@_friendly_errors
def sweep(space_path, dask_address, workers, gpus_per_trial, tracking_uri, data_path) -> None:
    """Run a YAML search space as parallel trials on Dask; register the best trial."""
    from vit_pipeline.sweep import check_cluster_api, load_space, trial_configs

    overrides = {k: v for k, v in (("tracking_uri", tracking_uri), ("data_path", data_path)) if v}
    from vit_pipeline.data import check_source

    configs = [cfg for _, cfg in trial_configs(load_space(space_path), overrides)]  # before Prefect, Dask, TF
    for source in {(c.dataset, c.data_path): c for c in configs}.values():  # each data source once
        check_source(source)
    check_cluster_api(dask_address)
    from vit_pipeline.flows.sweep import sweep as sweep_flow

    _start_temporary_prefect_server()
    with console_without_tracebacks():
        result = sweep_flow(space_path=space_path, dask_address=dask_address, n_workers=workers,
                            gpus_per_trial=gpus_per_trial, overrides=overrides)  # fmt: skip
    click.echo(json.dumps({k: result[k] for k in ("parent_run_id", "best", "test_accuracy", "registry", "seconds")},
                          indent=2, default=str))  # fmt: skip


@main.command()
@_config_options
@_resume_option
@_friendly_errors
def train(resume_run_id: str | None, **kwargs) -> None:
    """Prepare data and train, without Prefect; logs to a new (or resumed) MLflow run."""
    from vit_pipeline import data, runs
    from vit_pipeline import train as train_stage
    from vit_pipeline.context import StageContext

    preset, overrides = _split_config(kwargs)
    cfg = make_config(preset, overrides)
    if not resume_run_id:  # a new run must not start on a bad path (a resumed one has its data prepared)
        data.check_source(cfg)
    with runs.tracked_run(cfg, preset, {runs.COMMAND_TAG: "train"}, resume_run_id=resume_run_id) as run_id:
        click.echo(f"MLflow run {run_id} (resume with --resume {run_id})", err=True)
        ctx = StageContext.open(cfg, run_id)
        prepared = data.run(ctx, data.fetch(cfg))
        trained = train_stage.run(ctx, prepared.data_path)
    click.echo(
        json.dumps({"mlflow_run_id": run_id, "data_path": prepared.data_path, **trained.to_dict()}, indent=2)
    )


@main.command("runs")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: the local SQLite store).")
@click.option("--experiment", "experiments", multiple=True, help="Only this experiment (repeat the option).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@_friendly_errors
def list_runs(tracking_uri: str | None, experiments: tuple[str, ...], limit: int) -> None:
    """List the newest MLflow runs with their status (runs of dead processes are marked KILLED first)."""
    from vit_pipeline import runs, tracking

    cfg = make_config("quickstart", {"tracking_uri": tracking_uri})
    from vit_consumer.mlflow_store import sqlite_file

    uri = tracking.tracking_uri(cfg)
    if (database := sqlite_file(uri)) is not None and not database.exists():
        # A listing only reads: a mistyped path made a new, empty store that read as "no runs".
        raise PipelineError(f"No MLflow store at {uri}: no runs were ever logged there (a mistyped path?)")
    tracking.check_reachable(cfg)
    for run_id in runs.reap_once(cfg):
        click.echo(f"Marked {run_id} KILLED: its process is gone", err=True)
    client = tracking.client(cfg)
    missing = sorted(name for name in set(experiments) if client.get_experiment_by_name(name) is None)
    if missing:  # an empty listing would read as "no runs there"
        raise PipelineError(
            f"No experiment named {', '.join(map(repr, missing))} in {tracking.tracking_uri(cfg)}"
        )
    for row in runs.recent(client, list(experiments), limit):
        click.echo(json.dumps(row))


@main.command()
@click.argument("model_path", type=click.Path(dir_okay=False))
@_config_options
@_friendly_errors
def evaluate(model_path: str, **kwargs) -> None:
    """Evaluate a saved .keras MODEL_PATH on the config's test split; logs to MLflow."""

    from vit_pipeline import data, runs
    from vit_pipeline import evaluate as evaluate_stage
    from vit_pipeline.context import StageContext
    from vit_pipeline.errors import DataError
    from vit_pipeline.model import keras_config

    if not Path(model_path).is_file():
        raise DataError(f"Model file does not exist: {model_path}")
    keras_config(model_path)  # checked before a run is opened (it failed inside one)
    preset, overrides = _split_config(kwargs)
    cfg = make_config(preset, overrides)
    data.check_source(cfg)
    with runs.tracked_run(cfg, preset, {runs.COMMAND_TAG: "evaluate", "model_path": model_path}) as run_id:
        ctx = StageContext.open(cfg, run_id)
        prepared = data.run(ctx, data.fetch(cfg))
        result = evaluate_stage.run(ctx, prepared.data_path, model_path, None)
    click.echo(json.dumps({"mlflow_run_id": run_id, **result.to_dict()}, indent=2))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_uri", required=True,
              help="An exported .onnx file, or a registry URI such as models:/vit-digits@champion.")  # fmt: skip
@click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs (default: local store)."
)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, contract.MAX_TOP_K))
@_friendly_errors
def predict(images: tuple[str, ...], model_uri: str, tracking_uri: str | None, top_k: int) -> None:
    """Classify IMAGES (any format the consumer reads: PNG, JPEG, WebP, GIF, BMP, TIFF, PPM, TGA) with an exported
    ONNX model (ONNX Runtime only)."""

    from vit_consumer import InputError, OnnxClassifier

    from vit_pipeline import tracking
    from vit_pipeline.errors import DataError

    try:
        clf = OnnxClassifier.from_uri(model_uri, tracking_uri or tracking.tracking_uri())
        for image in images:
            if not Path(image).is_file():
                raise InputError(f"Image file does not exist: {image}")
            (preds,) = clf.predict(clf.decode_image(Path(image).read_bytes())[None], top_k)
            click.echo(json.dumps({"image": image, "predictions": preds}))
    except InputError as exc:
        raise DataError(str(exc)) from exc


@main.command("export-serving")
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs (default: local store)."
)
@click.option("--storage-uri", default=None,
              help="Where the triton/ folder will be uploaded, for KServe (default: pvc://vit-models/triton).")  # fmt: skip
@click.option("--consumer-image", default="vit-consumer:latest", show_default=True,
              help="Container image of deploy/consumer (its Dockerfile) for the Kubernetes manifests.")  # fmt: skip
@click.option(
    "--max-batch-size", default=64, show_default=True, type=click.IntRange(1, contract.MAX_BATCH_SIZE)
)
@click.option("--queue-delay-us", default=2000, show_default=True, type=click.IntRange(0),
              help="Triton's dynamic batching: how long a batch waits for company.")  # fmt: skip
@click.option("--consumer-tracking-uri", default=None,
              help="The MLflow server the consumer's pods read models:/ from (default: --tracking-uri when it is "
                   "another machine's HTTP server, else http://mlflow:5000).")  # fmt: skip
@_friendly_errors
def export_serving(
    source,
    out_dir,
    tracking_uri,
    storage_uri,
    consumer_image,
    max_batch_size,
    queue_delay_us,
    consumer_tracking_uri,
) -> None:
    """Write SOURCE (models:/name@champion, models:/name/N or an .onnx export) as a Triton model repository,
    a KServe InferenceService and Kubernetes manifests for the consumer, under OUT_DIR."""
    from vit_pipeline import tracking
    from vit_pipeline.serving_export import export_serving as write

    written = write(source, out_dir, tracking_uri or tracking.tracking_uri(), storage_uri=storage_uri,
                    consumer_image=consumer_image, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                    consumer_tracking_uri=consumer_tracking_uri)  # fmt: skip
    for key in ("triton", "kserve", "kubernetes"):
        click.echo(f"{key}: {written[key]}")
    click.echo(f"Model {written['name']!r} version {written['version']}")
    if written["note"]:
        click.echo(f"Note: {written['note']}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})  # fmt: skip
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Serve a model over HTTP: the TF-free consumer (vit-consumer), the same options.

    ``vit-pipeline serve --model models:/vit-digits@champion [--port 8000 ...]``;
    ``vit-pipeline serve --help`` lists them all.
    """
    from vit_consumer.__main__ import main as consumer_main

    args = list(ctx.args)
    if "--help" in args or "-h" in args:
        print("vit-pipeline serve takes vit-consumer's options, in any order: its global ones (--model, --engine, "
              "...) and those of its serve command.\n")  # fmt: skip
        with contextlib.suppress(SystemExit):
            consumer_main(["--help"])
        print()
        sys.exit(consumer_main(["--model", "-", "serve", "--help"]))
    # The consumer's global options (GLOBAL_OPTIONS: --model, --engine, ...) come before its subcommand.
    globals_, rest = _split_consumer_args(args)
    if not any(a.split("=", 1)[0] == "--tracking-uri" for a in globals_):
        from vit_pipeline.tracking import tracking_uri

        globals_ += ["--tracking-uri", tracking_uri()]  # the pipeline's store, as for `predict`
    sys.exit(consumer_main([*globals_, "serve", *rest]))


def _split_consumer_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the consumer's global options with their values, everything else)."""
    from vit_consumer.__main__ import GLOBAL_OPTIONS

    globals_, rest, i = [], [], 0
    while i < len(args):
        name = args[i].split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            take = 1 if "=" in args[i] else 2
            globals_ += args[i : i + take]
            i += take
        else:
            rest.append(args[i])
            i += 1
    return globals_, rest


@main.command()
@click.argument("model_path", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--preset", default=None, help="No model given: time this preset's architecture with fresh weights."
)
@click.option("--keras", "keras_path", default=None, type=click.Path(dir_okay=False),
              help="The .keras model behind MODEL_PATH, for the Keras baseline rows.")  # fmt: skip
@click.option("--eval-data", default=None,
              help="Real test images for accuracy: a cifar-100-python dir/.tar.gz or a prepared data.npz.")  # fmt: skip
@click.option("--eval-images", default=512, show_default=True, type=click.IntRange(1))
@click.option("--batch-sizes", default="1,8,64,256", show_default=True)
@click.option("--variants", default="fp32,optimized,int8,int8-static,fp16", show_default=True,
              help="int8-static is calibrated on --eval-data's training images; fp16 runs on GPUs only.")  # fmt: skip
@click.option(
    "--providers", default=None, help="e.g. cpu,cuda,tensorrt (default: every provider this build has)."
)
@click.option("--seconds", default=1.0, show_default=True, type=FiniteRange(0.01), help="Per cell and round.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1))
@click.option(
    "--xla/--no-xla",
    default=True,
    show_default=True,
    help="Also time Keras with XLA (best one is the baseline).",
)
@click.option("--openvino/--no-openvino", default=True, show_default=True,
              help="OpenVINO rows, when it is installed (pip install -e '.[openvino]').")  # fmt: skip
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Peak RSS per backend, each measured in a child process.")  # fmt: skip
@click.option("--output", default="benchmark/report.json", show_default=True, type=click.Path(dir_okay=False),
              help="The JSON report; its folder also gets report.json, report.md, throughput.png and the timed "
                   "variants.")  # fmt: skip
@_friendly_errors
def benchmark(model_path, preset, keras_path, eval_data, eval_images, batch_sizes, variants, providers,
              seconds, rounds, xla, openvino, memory, output) -> None:  # fmt: skip
    """Time MODEL_PATH (any ONNX image classifier), a .keras model or a preset's ViT.

    Keras (tf.function, and XLA) is the baseline; ONNX Runtime runs each provider
    and variant, OpenVINO (when installed) the same files. Prints the table, the
    served candidate and the speed ratios measured side by side.
    """

    from vit_pipeline import benchmark as bench
    from vit_pipeline.benchmark.stage import models_to_time
    from vit_pipeline.config import parse_int_list, split_names
    from vit_pipeline.variants import VARIANTS

    try:
        sizes = parse_int_list(batch_sizes)
    except (TypeError, ValueError):
        sizes = ()
    if (
        not sizes or min(sizes) < 1 or max(sizes) > contract.MAX_BATCH_SIZE
    ):  # a typo of 10 digits: the OOM killer
        raise ConfigError(f"Expected batch sizes from 1 to {contract.MAX_BATCH_SIZE}. Received: "
                          f"batch_sizes={batch_sizes!r}")  # fmt: skip
    names = tuple(split_names(variants))
    unknown = set(names) - set(VARIANTS)
    if unknown or not names:
        raise ConfigError(f"Expected variants from {', '.join(VARIANTS)}. Received: variants={variants!r}")
    out_dir = Path(output).parent
    _check_writable(output)
    bench.resolve_providers(
        split_names(providers or "") or None
    )  # an unknown name: before any file is written
    images, labels, calibration = _eval_data(eval_data, eval_images)  # before any file is written
    models = models_to_time(model_path, preset, keras_path, out_dir, labels)
    report, files = bench.benchmark_files(
        models.onnx_path, out_dir, keras_model=models.keras_model, eval_images=images, eval_labels=labels,
        variants=names, providers=split_names(providers or "") or None,
        scenario=bench.Scenario(batch_sizes=tuple(sizes), min_seconds=seconds, rounds=rounds),
        keras_xla=xla and models.keras_model is not None, model_info=models.info, calibration=calibration,
        keras_path=models.keras_path, openvino=openvino, memory=memory,
    )  # fmt: skip
    if Path(output) != files["json"]:
        Path(output).write_text(files["json"].read_text())
    click.echo(report.to_markdown())
    for line in report.ratios():
        click.echo(line)
    click.echo(f"Wrote {output}, {files['markdown']}, {files['plot']}")


@main.command("train-benchmark")
@click.option("--preset", "presets", multiple=True, default=("cifar100", "cifar100-improved"), show_default=True,
              type=click.Choice(list(PRESETS)), help="Presets to time (repeat the option).")  # fmt: skip
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1), help="Timed steps per cell.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option(
    "--output", default="benchmark/training.json", show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--rerun-failed", is_flag=True, help="Keep the successful cells of --output; run the others again."
)
@click.option("--finetune-optimizer-rounds", default=0, show_default=True, type=click.IntRange(0),
              help="Instead: time the first --preset with its own optimizer and with the fine-tuning one "
                   "(layer decay, head-only start), alternating, this many rounds.")  # fmt: skip
@_friendly_errors
def train_benchmark(presets, steps, warmup, output, rerun_failed, finetune_optimizer_rounds) -> None:
    """Training img/s on this machine: each preset with and without XLA and mixed_bfloat16."""

    from vit_pipeline.benchmark.training import (
        TrainingReport,
        compare_finetune_optimizer,
        run_training_benchmark,
    )
    from vit_pipeline.errors import DataError

    _check_writable(output)  # before minutes of timing, not after
    keep = None
    if rerun_failed and Path(output).exists():
        try:
            keep = TrainingReport.from_json(output)
        except Exception as exc:  # another file, or damaged: one line
            raise DataError(f"Cannot read {output} as a training benchmark report to rerun: {exc}") from None
    if finetune_optimizer_rounds:
        report = compare_finetune_optimizer(presets[0], finetune_optimizer_rounds, steps=steps, warmup=warmup)
    else:
        report = run_training_benchmark(list(presets), steps=steps, warmup=warmup, keep=keep)
    report.save_json(output)
    click.echo(report.to_markdown())
    click.echo(f"Wrote {output}")


@main.command("benchmark-docs")
@click.option("--reports", default="docs/benchmarks", show_default=True, type=click.Path(file_okay=False))
@click.option("--output", default="docs/benchmarks.md", show_default=True, type=click.Path(dir_okay=False))
@_friendly_errors
def benchmark_docs(reports, output) -> None:
    """Regenerate docs/benchmarks.md from the committed reports."""

    from vit_pipeline.benchmark.docs import write
    from vit_pipeline.errors import DataError

    if not Path(reports).is_dir():
        raise DataError(f"Reports folder does not exist: {reports}")
    click.echo(f"Wrote {write(reports, output)}")


def _check_writable(output: str) -> None:
    """``output``'s folder exists or can be made: a file in the way is said before the work, in one line."""
    from vit_pipeline.errors import DataError

    for parent in Path(output).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"Cannot write {output}: {parent} is a file, not a folder")
            return


def _eval_data(path: str | None, limit: int):
    """(test images, labels, calibration images) from a CIFAR-100 copy or a prepared data.npz.

    Calibration images (for int8-static) are up to 256 training images, never test images.
    """
    if path is None:
        return None, None, None

    from vit_pipeline import data
    from vit_pipeline.errors import DataError

    if Path(path).suffix == ".npz":
        try:
            splits = data.Splits.load(path)
        except Exception as exc:  # not an npz this project wrote: one line, as for an archive
            raise DataError(f"Cannot read --eval-data {path} as a prepared split (data.npz): {exc}") from None
        x_train, x_test, y_test = splits.x_train, splits.x_test, splits.y_test
    else:
        x_train, _, x_test, y_test, _ = data.read_cifar100(path)
    from vit_pipeline.variants import calibration_sample

    return x_test[:limit], y_test[:limit], calibration_sample(x_train)


if __name__ == "__main__":
    main()
