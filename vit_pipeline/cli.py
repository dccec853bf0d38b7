"""The ``vit-pipeline`` command line.

Every config field is an option (``--patch-size 4``, ``--mlp-head-units 2048,1024``,
``--data-path none``) on top of ``--preset``. Problems with input are reported as
one line on stderr with a non-zero exit; the full traceback goes to the log file
under ``$VIT_PIPELINE_HOME/logs``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from vit_pipeline import __version__
from vit_pipeline.config import PRESETS, field_names, make_config
from vit_pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("vit_pipeline")


def _config_options(func: Callable) -> Callable:
    """Adds ``--preset`` and one string option per config field."""
    for name in reversed(field_names()):
        func = click.option(
            f"--{name.replace('_', '-')}",
            name,
            default=None,
            metavar="VALUE",
            help=f"Override config field {name} (see `vit-pipeline config`).",
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
    if not any(isinstance(h, logging.FileHandler) for h in log.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return str(path)


def _quiet_telemetry() -> None:
    """No network here: keep Prefect's and MLflow's usage pings from trying (and logging)."""
    for var in ("PREFECT_SERVER_ANALYTICS_ENABLED",):
        os.environ.setdefault(var, "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _friendly_errors(func: Callable) -> Callable:
    """One line on stderr and exit 2 (bad config) or 1 (other input) instead of a trace."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        log_path = _setup_logging()
        _quiet_telemetry()
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            log.exception("vit-pipeline failed")
            click.echo(f"Error: {exc}", err=True)
            click.echo(f"(details: {log_path})", err=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="vit-pipeline")
def main() -> None:
    """Train, evaluate, export and serve a Vision Transformer."""


@main.command("config")
@_config_options
@_friendly_errors
def show_config(**kwargs) -> None:
    """Print the resolved, validated config as JSON."""
    preset, overrides = _split_config(kwargs)
    click.echo(make_config(preset, overrides).to_json())


@main.command()
@_config_options
@_friendly_errors
def run(**kwargs) -> None:
    """Run the whole pipeline as a Prefect flow (data, train, evaluate)."""
    preset, overrides = _split_config(kwargs)
    make_config(preset, overrides)  # fail before Prefect or TensorFlow start
    from flows.train_pipeline import train_pipeline

    result = train_pipeline(preset=preset, overrides=overrides)
    click.echo(json.dumps(result, indent=2))


@main.command()
@_config_options
@_friendly_errors
def train(**kwargs) -> None:
    """Prepare data and train, without Prefect; logs to a new MLflow run."""
    from vit_pipeline import stages, tracking

    preset, overrides = _split_config(kwargs)
    cfg = make_config(preset, overrides)
    run_id = tracking.create_run(cfg, preset, {"vit_pipeline.command": "train"})
    status = "FAILED"
    try:
        prepared = stages.prepare_stage(cfg, run_id, stages.fetch_stage(cfg))
        trained = stages.train_stage(cfg, run_id, prepared["data_path"])
        status = "FINISHED"
    finally:
        tracking.client(cfg).set_terminated(run_id, status)
    click.echo(json.dumps({"mlflow_run_id": run_id, "data_path": prepared["data_path"], **trained}, indent=2))


@main.command()
@click.argument("model_path", type=click.Path(dir_okay=False))
@_config_options
@_friendly_errors
def evaluate(model_path: str, **kwargs) -> None:
    """Evaluate a saved .keras MODEL_PATH on the config's test split; logs to MLflow."""
    from pathlib import Path

    from vit_pipeline import stages, tracking
    from vit_pipeline.errors import DataError

    if not Path(model_path).is_file():
        raise DataError(f"Model file does not exist: {model_path}")
    preset, overrides = _split_config(kwargs)
    cfg = make_config(preset, overrides)
    run_id = tracking.create_run(cfg, preset, {"vit_pipeline.command": "evaluate", "model_path": model_path})
    status = "FAILED"
    try:
        prepared = stages.prepare_stage(cfg, run_id, stages.fetch_stage(cfg))
        result = stages.evaluate_stage(cfg, run_id, prepared["data_path"], model_path, None)
        status = "FINISHED"
    finally:
        tracking.client(cfg).set_terminated(run_id, status)
    click.echo(json.dumps({"mlflow_run_id": run_id, **result}, indent=2))


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_uri", required=True,
              help="An exported .onnx file, or a registry URI such as models:/vit-digits@champion.")  # fmt: skip
@click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs (default: local store)."
)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@_friendly_errors
def predict(images: tuple[str, ...], model_uri: str, tracking_uri: str | None, top_k: int) -> None:
    """Classify IMAGES (PNG/JPEG) with an exported ONNX model (ONNX Runtime only)."""
    from pathlib import Path

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


if __name__ == "__main__":
    main()
