"""Hyper-parameter sweeps: a YAML search space, expanded into validated trials.

A search space file::

    preset: cifar100-improved      # the base recipe
    method: grid                   # grid (every combination) or random
    num_trials: 8                  # random only
    seed: 0                        # random only: which combinations are drawn
    metric: best_val_accuracy      # the winner has the highest value (validation,
                                   # never test: the test set stays unseen)
    fixed:                         # applied to every trial
      epochs: 30
    parameters:
      learning_rate: [0.0005, 0.001, 0.002]        # values (grid or random)
      stochastic_depth_rate: [0.0, 0.1]
      weight_decay: {min: 0.01, max: 0.1, log: true}   # a range (random only)

Every trial's config is validated before any trial starts, so a typo fails the
sweep in one line instead of after hours of training.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vit_pipeline.config import PRESETS, PipelineConfig, field_names, make_config
from vit_pipeline.errors import ConfigError

METHODS = ("grid", "random")
MAX_TRIALS = 10_000  # a sweep of more trials is a typo, not a plan (and its list alone fills memory)
MAX_FILE_BYTES = 1_000_000
METRICS = ("best_val_accuracy",)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed search space (see the module docstring for the file format)."""

    preset: str
    parameters: dict[str, Any]
    method: str = "grid"
    num_trials: int | None = None
    seed: int = 0
    metric: str = "best_val_accuracy"
    fixed: dict[str, Any] = field(default_factory=dict)


SWEEP_OWNED = ("tracking_uri",)


def parse_space(raw: Any, source: str = "search space") -> SearchSpace:
    """Validates a loaded YAML/JSON mapping into a SearchSpace.

    Raises:
        ConfigError: naming the bad key and value.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"Expected {source} to be a mapping. Received: {type(raw).__name__}")
    known = {"preset", "method", "num_trials", "seed", "metric", "fixed", "parameters"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"Unknown keys in {source}: {unknown}. Known keys: {sorted(known)}")
    preset = raw.get("preset", "quickstart")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"Unknown preset. Expected one of {tuple(PRESETS)}. Received: preset={preset!r}")
    method = raw.get("method", "grid")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"Expected method in {METHODS}. Received: method={method!r}")
    metric = raw.get("metric", "best_val_accuracy")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ConfigError(f"Expected metric in {METRICS}. Received: metric={metric!r}")
    parameters = raw.get("parameters") or {}
    fixed = raw.get("fixed") or {}
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"Expected {source} to have a non-empty 'parameters' mapping")
    if not isinstance(fixed, dict):
        raise ConfigError(f"Expected 'fixed' in {source} to be a mapping")
    for name in {**fixed, **parameters}:
        if name not in field_names():
            raise ConfigError(f"Unknown config field {name!r} in {source}")
        if name in SWEEP_OWNED:  # trials in another store than their sweep run: a Dask pickling traceback
            raise ConfigError(f"{name} is the sweep's own (--{name.replace('_', '-')}), not a field of {source}: "
                              "the sweep run and its trials share one store")  # fmt: skip
    for name, spec in parameters.items():
        _check_spec(name, spec, method)
    num_trials = raw.get("num_trials")
    if method == "random" and (type(num_trials) is not int or not 0 < num_trials <= MAX_TRIALS):
        raise ConfigError(f"Expected num_trials from 1 to {MAX_TRIALS} for method 'random'. Received: "
                          f"num_trials={num_trials!r}")  # fmt: skip
    if method == "grid" and (combos := math.prod(len(v) for v in parameters.values())) > MAX_TRIALS:
        raise ConfigError(f"The grid has {combos} combinations; at most {MAX_TRIALS} are accepted")
    seed = raw.get("seed", 0)
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise ConfigError(f"Expected seed to be an integer from 0 to 2**32 - 1. Received: seed={seed!r}")
    return SearchSpace(preset=preset, parameters=parameters, method=method, num_trials=num_trials,
                       seed=seed, metric=metric, fixed=fixed)  # fmt: skip


def _check_spec(name: str, spec: Any, method: str) -> None:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"Expected at least one value for parameter {name}")
        return
    if isinstance(spec, dict):
        if method == "grid":
            raise ConfigError(f"Parameter {name} is a range; grid search needs a list of values")
        numbers = all(type(spec.get(k)) in (int, float) and math.isfinite(spec[k]) for k in ("min", "max"))
        flags = all(isinstance(spec.get(k, False), bool) for k in ("log", "int"))
        if (
            set(spec) - {"min", "max", "log", "int"}
            or not {"min", "max"} <= set(spec)
            or not numbers
            or not flags
        ):
            raise ConfigError(f"Expected parameter {name} as {{min, max, log?, int?}}: finite numbers, true or "
                              f"false. Received: {str(spec)[:200]}")  # fmt: skip
        if not spec["min"] < spec["max"] or (spec.get("log") and spec["min"] <= 0):
            raise ConfigError(
                f"Expected 0 < min < max (log) or min < max for parameter {name}. Received: {spec}"
            )
        return
    raise ConfigError(
        f"Expected parameter {name} as a list of values or a {{min, max}} range. Received: {spec!r}"
    )


def load_space(path: str | Path) -> SearchSpace:
    """Reads a search space YAML file (``yaml.safe_load``: data only, no objects)."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        """``safe_load`` without anchors and aliases: a few hundred bytes of them expand to gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("aliases (*name) are not accepted in a search space")
            return super().compose_node(parent, index)

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Search space file does not exist: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"Search space {path} holds {path.stat().st_size} bytes; at most {MAX_FILE_BYTES}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliases)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"Could not parse search space {path}: {first}") from None
    return parse_space(raw, str(path))


def _draw(spec: Any, rng: random.Random) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    low, high = spec["min"], spec["max"]
    value = (
        math.exp(rng.uniform(math.log(low), math.log(high))) if spec.get("log") else rng.uniform(low, high)
    )
    return int(round(value)) if spec.get("int") else value


def trial_overrides(space: SearchSpace) -> list[dict[str, Any]]:
    """The varying fields of every trial, in a stable order."""
    names = sorted(space.parameters)
    if space.method == "grid":
        return [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(space.parameters[n] for n in names))
        ]
    rng = random.Random(space.seed)
    return [{n: _draw(space.parameters[n], rng) for n in names} for _ in range(space.num_trials)]


def trial_configs(
    space: SearchSpace, shared: dict[str, Any] | None = None
) -> list[tuple[dict, PipelineConfig]]:
    """(varying fields, validated config) per trial; raises ConfigError on the first bad one."""
    out = []
    for i, varying in enumerate(trial_overrides(space)):
        try:
            cfg = make_config(space.preset, {**space.fixed, **(shared or {}), **varying})
        except ConfigError as exc:
            raise ConfigError(f"Trial {i} ({varying}): {exc}") from None
        out.append((varying, cfg))
    return out


def check_cluster_api(dask_address: str | None) -> None:
    """Refuses a sweep on an existing Dask cluster whose flow reports to a temporary Prefect server.

    Without ``PREFECT_API_URL`` Prefect starts a temporary server on this host's loopback, which
    only this process can see; a Dask worker (on another host, or in another session) would start
    one of its own, and its trials' task states would go where nobody reads them.

    Raises:
        ConfigError: ``dask_address`` is set and the Prefect API is a temporary server.
    """
    from prefect.settings import get_current_settings

    if dask_address and not get_current_settings().api.url:
        raise ConfigError(
            f"A sweep on the Dask cluster at {dask_address} needs one Prefect API that its workers reach: set "
            "PREFECT_API_URL to a real Prefect server (e.g. http://<this host>:4200/api, started with "
            "`deploy/local.sh prefect-server`); without it Prefect uses a temporary server on this host's loopback"
        )


def settle_lost_attempts(
    client, experiment_id: str, parent_run_id: str, results: list[dict[str, Any]]
) -> list[dict]:
    """Ends every run under the sweep that is not terminal once its trials have returned: a lost attempt.

    A trial whose worker died (a host lost, a SIGKILL) leaves its MLflow run RUNNING, and the
    orchestrator runs the trial again elsewhere. Once every trial has returned, nothing can still be
    working for this sweep, so each such run is marked KILLED now, with the reason the sweep knows
    (its trial finished as another run) or else the one lifecycle rule's (``runs.liveness``), instead
    of waiting for the next command to reap it. Rows of the sweep's table.
    """
    from vit_pipeline import runs

    finished = {str(r["index"]): r.get("run_id") for r in results}
    open_runs = client.search_runs(
        [experiment_id], max_results=1000,
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status != 'FINISHED' "
                      "and attributes.status != 'FAILED' and attributes.status != 'KILLED'",
    )  # fmt: skip
    lost = []
    for run in open_runs:
        trial = run.data.tags.get("sweep.trial", "?")
        rerun = finished.get(trial)
        if rerun and rerun != run.info.run_id:
            why = f"worker lost: trial {trial} was re-run as run {rerun}"
        else:
            why = f"worker lost: {runs.liveness(run.data.tags).reason}; the sweep's trials have all returned"
        runs.end_run(client, run.info.run_id, "KILLED", f"Marked KILLED by the sweep {parent_run_id}: {why}")
        lost.append({"trial": int(trial) if trial.isdigit() else trial, "run_id": run.info.run_id,
                     "rerun_as": rerun if rerun != run.info.run_id else None, "reason": why})  # fmt: skip
    return lost


def best_trial(results: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The finished trial with the highest ``metric`` (None if every trial failed)."""
    ok = [r for r in results if r.get("status") == "ok"]
    return max(ok, key=lambda r: r[metric]) if ok else None


def run_trial(
    preset: str, cfg: dict[str, Any], parent_run_id: str, index: int, varying: dict[str, Any]
) -> dict:
    """One sweep trial: its own MLflow run nested under the sweep's, data, training.

    Returns metrics and paths, never the model. A failed trial's MLflow run ends
    FAILED with the error as a tag (``runs.lifecycle``), and the error is raised
    again so the orchestrator records the trial as failed.
    """
    import os
    import socket
    import time

    from vit_pipeline import progress

    progress.quiet_libraries()  # before TensorFlow: a Dask worker's process, maybe on another host

    import keras

    from vit_pipeline import data, data_validation, runs, train
    from vit_pipeline.config import from_dict
    from vit_pipeline.context import StageContext

    cfg = from_dict(cfg)  # the sweep's sub-flow parameters are JSON: the config arrives as its dict
    keras.backend.clear_session()  # a worker process runs trial after trial
    tags = {"mlflow.parentRunId": parent_run_id, "sweep.trial": str(index), runs.COMMAND_TAG: "sweep-trial",
            **{f"sweep.param.{k}": str(v) for k, v in varying.items()}}  # fmt: skip
    start = time.time()
    where = {"pid": os.getpid(), "host": socket.gethostname()}
    with runs.tracked_run(cfg, preset, tags) as run_id:
        ctx = StageContext.open(cfg, run_id)
        prepared = data.run(ctx, data.fetch(cfg))
        validated = data_validation.run(ctx, prepared.data_path)  # the winner's gate tags go to its version
        trained = train.run(ctx, validated.data_path)
    return {
        "status": "ok",
        "index": index,
        "run_id": run_id,
        "params": varying,
        "best_val_accuracy": trained.best_val_accuracy,
        "model_path": trained.model_path,
        "history_path": trained.history_path,
        "data_path": validated.data_path,
        "start": start,
        "end": time.time(),
        **where,
    }
