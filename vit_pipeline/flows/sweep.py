"""The ``sweep`` flow: parallel trials on Dask, nested MLflow runs, the winner registered.

Trials run as Prefect tasks on a Dask cluster through ``prefect-dask``'s
``DaskTaskRunner``: an existing cluster (``dask_address``, e.g. started with
``deploy/local.sh dask-scheduler`` / ``dask-worker``) or a temporary local one
(``n_workers`` processes, one thread each: one TensorFlow training per process).
When the cluster has GPUs, each trial asks for one (``GPU`` worker resource), so
Dask never puts two trainings on one GPU.

Each trial is an MLflow run nested under the sweep's parent run and returns
metrics and paths, never a model; a failed trial is recorded (MLflow run FAILED
with the error, a row in the sweep table) and the sweep goes on. The best trial
by validation accuracy then goes through the same evaluate -> export + parity
gate -> champion/challenger registration as ``train-pipeline``. Paths are shared:
Dask workers must see the flow's ``VIT_PIPELINE_HOME`` (one host, or a shared
file system) and the MLflow tracking URI.
"""

from __future__ import annotations

import contextlib
import glob
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from vit_pipeline import progress, runs, tracking
from vit_pipeline import sweep as sweep_mod
from vit_pipeline.config import ConfigOverrides, make_config, merged_overrides
from vit_pipeline.context import StageContext
from vit_pipeline.errors import PipelineError
from vit_pipeline.flows import artifacts
from vit_pipeline.flows.train_pipeline import _prefect_tags, after_training
from vit_pipeline.sweep import (
    best_trial,
    check_cluster_api,
    load_space,
    parse_space,
    settle_lost_attempts,
    trial_configs,
)


@task(name="trial", cache_policy=NO_CACHE)
def run_trial(preset: str, cfg: dict, parent_run_id: str, index: int, varying: dict) -> dict:
    return sweep_mod.run_trial(preset, cfg, parent_run_id, index, varying)


@flow(name="sweep-trials")
def run_trials(preset: str, trials: list[dict], parent_run_id: str, gpus_per_trial: float) -> list[dict]:
    """Submits every trial to the task runner at once and waits for all of them."""
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    import dask

    futures = []
    for i, trial in enumerate(trials):
        annotate = (
            dask.annotate(resources={"GPU": gpus_per_trial}) if gpus_per_trial else contextlib.nullcontext()
        )
        with annotate:
            futures.append(run_trial.with_options(task_run_name=f"trial-{i}").submit(
                preset, trial["config"], parent_run_id, i, trial["varying"]))  # fmt: skip
    results = []
    for i, future in enumerate(futures):
        out = future.result(raise_on_failure=False)
        if isinstance(out, BaseException) or not isinstance(out, dict):
            results.append({"status": "failed", "index": i, "params": trials[i]["varying"],
                            "error": f"{type(out).__name__}: {out}"[:500]})  # fmt: skip
        else:
            results.append(out)
    return results


def local_gpu_count() -> int:
    return len(glob.glob("/dev/nvidia[0-9]*"))


def cluster_gpus(address: str) -> float:
    """The most GPUs any worker of the cluster at ``address`` advertises."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return max((w.get("resources", {}).get("GPU", 0) for w in workers), default=0)


def task_runner(dask_address: str | None, n_workers: int, gpus: int):
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    kwargs: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True}
    if gpus:
        kwargs.update(n_workers=gpus, resources={"GPU": 1})  # one worker per GPU
    return DaskTaskRunner(cluster_kwargs=kwargs)


def _row(r: dict) -> dict:
    return {"trial": r["index"], "status": r["status"], "params": str(r["params"]),
            "best_val_accuracy": r.get("best_val_accuracy"), "seconds": round(r["end"] - r["start"], 1)
            if "end" in r else None, "mlflow_run_id": r.get("run_id"), "error": r.get("error", "")}  # fmt: skip


def _lost_row(x: dict) -> dict:
    return {"trial": x["trial"], "status": "lost", "params": "", "best_val_accuracy": None, "seconds": None,
            "mlflow_run_id": x["run_id"], "error": x["reason"]}  # fmt: skip


@flow(name="sweep", log_prints=True)
def sweep(
    space_path: str | None = None,
    space: dict | None = None,
    dask_address: str | None = None,
    n_workers: int = 2,
    gpus_per_trial: float | None = None,
    config: ConfigOverrides = ConfigOverrides(),  # noqa: B008 (frozen: a shared default is safe)
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Runs a search space as parallel trials and registers the best one.

    Args:
        space_path: A search space YAML file (see ``vit_pipeline.sweep``).
        space: The same as a mapping (instead of ``space_path``).
        dask_address: Scheduler of an existing Dask cluster (``tcp://host:8786``);
            None starts a local cluster of ``n_workers`` processes.
        n_workers: Worker processes of the local cluster.
        gpus_per_trial: GPUs each trial asks for; None: 1 when the cluster (or
            this machine, for a local cluster) has GPUs, else 0.
        config: Typed config fields for every trial (e.g. ``tracking_uri``, ``data_path``).
        overrides: The untyped form of ``config`` (kept for old callers).

    Returns:
        The parent MLflow run, every trial's row, the best trial and the registry decision.
    """
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    check_cluster_api(dask_address)  # before any run or trial: one Prefect API for the whole cluster
    parsed = load_space(space_path) if space_path else parse_space(space)
    shared = merged_overrides(overrides, config)
    base = make_config(parsed.preset, {**parsed.fixed, **shared})
    shared["tracking_uri"] = tracking.tracking_uri(base)  # workers log to the same store
    trials = trial_configs(parsed, shared)  # every trial validated before any work
    if gpus_per_trial is None:
        gpus_per_trial = 1.0 if (cluster_gpus(dask_address) if dask_address else local_gpu_count()) else 0.0
    parent_cfg = make_config(
        parsed.preset, {**parsed.fixed, **shared, "run_name": f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"}
    )
    parent_tags = {**_prefect_tags(), "sweep.method": parsed.method, "sweep.num_trials": str(len(trials)),
                   "sweep.role": "parent", runs.COMMAND_TAG: "sweep"}  # fmt: skip
    with runs.tracked_run(parent_cfg, parsed.preset, parent_tags) as parent:
        parent_log = tracking.RunLogger.open(parent_cfg, parent)
        client = parent_log.client
        client.log_dict(parent, {"preset": parsed.preset, "method": parsed.method, "metric": parsed.metric,
                                 "fixed": parsed.fixed, "parameters": parsed.parameters}, "sweep/space.json")  # fmt: skip
        start = time.time()
        runner = task_runner(dask_address, n_workers, int(local_gpu_count() if gpus_per_trial else 0))
        try:
            results = run_trials.with_options(task_runner=runner)(
                parsed.preset,
                [{"varying": v, "config": c.to_dict()} for v, c in trials],
                parent,
                gpus_per_trial,
            )
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or crashed: the local cluster is gone, its trainings with it.
            # Their runs end KILLED now, with the reason, not at the next command; a remote worker that
            # is still alive keeps its run (the one liveness rule of runs.reap decides).
            with contextlib.suppress(Exception):
                runs.reap(client)
            raise
        trials_seconds = time.time() - start
        for r in results:  # a failed trial's run id, from its MLflow tags
            if r["status"] == "failed":
                found = client.search_runs([tracking.experiment_id(parent_cfg)], filter_string=(
                    f"tags.mlflow.parentRunId = '{parent}' and tags.`sweep.trial` = '{r['index']}'"))  # fmt: skip
                r["run_id"] = found[0].info.run_id if found else None
        # Every trial has returned: a run under the sweep still open is an attempt whose worker was lost.
        lost = settle_lost_attempts(client, tracking.experiment_id(parent_cfg), parent, results)
        rows = [_row(r) for r in results] + [_lost_row(x) for x in lost]
        client.log_table(parent, {k: [row[k] for row in rows] for k in rows[0]}, "sweep/trials.json")
        ok = [r for r in results if r["status"] == "ok"]
        parent_log.metrics({"trials_finished": len(ok), "trials_failed": len(results) - len(ok),
                            "trials_lost_attempts": len(lost), "trials_seconds": trials_seconds})  # fmt: skip
        artifacts.table("sweep-trials", rows, "Sweep trials")
        best = best_trial(results, parsed.metric)
        if best is None:
            raise PipelineError(f"Every one of the {len(results)} trials failed; see MLflow run {parent}")
        winner = trials[best["index"]][1]
        # The winner's run is RUNNING again while its remaining stages log into it.
        with runs.lifecycle(winner, best["run_id"]):
            ctx = StageContext.open(winner, best["run_id"])
            shipped = after_training(ctx, best["data_path"], best["model_path"], best["history_path"])
            accuracy, registered = shipped.evaluated.test_accuracy, shipped.registered
        parent_log.metrics({f"best_{parsed.metric}": best[parsed.metric], "best_test_accuracy": accuracy,
                            "sweep_seconds": time.time() - start})  # fmt: skip
        parent_log.tags({"sweep.best_run_id": best["run_id"], "sweep.best_params": str(best["params"])})
    if lost:
        print(f"Sweep {parent}: {len(lost)} attempt(s) lost with their worker, marked KILLED: "
              + "; ".join(f"trial {x['trial']} run {x['run_id']} ({x['reason']})" for x in lost))  # fmt: skip
    print(f"Sweep {parent}: {len(ok)}/{len(results)} trials finished; best {best['params']} "
          f"{parsed.metric}={best[parsed.metric]:.4f}, test accuracy {accuracy:.4f}; {registered.model_uri}")  # fmt: skip
    return {"parent_run_id": parent, "trials": results, "lost_attempts": lost, "best": best, "test_accuracy": accuracy,
            "registry": registered.to_dict(), "trials_seconds": trials_seconds, "seconds": time.time() - start}  # fmt: skip
