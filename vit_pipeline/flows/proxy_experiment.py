"""The ``proxy-experiment`` flow: the seed and the improved recipe, side by side.

Runs the full ``train-pipeline`` (train, evaluate, export + parity gate, register,
benchmark) once per preset on the same data, epochs and seed, into one MLflow
experiment, then writes the comparison table and curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from vit_pipeline import progress, tracking
from vit_pipeline.config import ConfigOverrides, make_config, merged_overrides
from vit_pipeline.experiments import compare_runs
from vit_pipeline.flows import artifacts
from vit_pipeline.flows.train_pipeline import train_pipeline

PRESETS = ("cifar100", "cifar100-improved")


@task(name="compare-runs", cache_policy=NO_CACHE)
def compare(tracking_uri: str | None, run_ids: list[str], report_dir: str) -> dict:
    cfg = make_config("cifar100", {"tracking_uri": tracking_uri})
    return compare_runs(tracking.client(cfg), run_ids, report_dir)


@flow(name="proxy-experiment", log_prints=True)
def proxy_experiment(
    data_path: str | None = None,
    epochs: int = 10,
    seed: int = 42,
    experiment_name: str = "vit-cifar100-proxy",
    report_dir: str = "docs/experiments/proxy",
    presets: tuple[str, ...] = PRESETS,
    config: ConfigOverrides = ConfigOverrides(),  # noqa: B008 (frozen: a shared default is safe)
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Trains each preset with the same data, epochs and seed; compares them.

    Args:
        data_path: Local CIFAR-100 copy (None: Keras' download/cache).
        epochs: Epochs for every preset.
        seed: Seed for split, initialisation and augmentation, shared by all.
        experiment_name: The one MLflow experiment that holds every run.
        report_dir: Where ``table.md``, ``curves.png`` and ``runs.json`` go.
        presets: Presets to compare, in table order.
        config: Further typed config fields applied to every preset.
        overrides: The untyped form of ``config`` (kept for old callers).

    Returns:
        The comparison rows and report paths.
    """
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    shared = {
        "data_path": data_path,
        "epochs": epochs,
        "seed": seed,
        "experiment_name": experiment_name,
        "registered_model_name": experiment_name,
        # A short benchmark: the experiment compares recipes, not runtimes.
        "benchmark_variants": "fp32,optimized",
        "serve_candidates": "optimized",  # no int8 candidates for an experiment's models
        "benchmark_batch_sizes": (1, 64),
        "benchmark_seconds": 0.5,
        "benchmark_rounds": 1,
        **merged_overrides(overrides, config),
    }
    for preset in presets:  # fail on a bad value before hours of training
        make_config(preset, {**shared, "run_name": preset})
    run_ids = []
    for preset in presets:
        result = train_pipeline(preset=preset, overrides={**shared, "run_name": preset})
        run_ids.append(result["mlflow_run_id"])
    report = compare(shared.get("tracking_uri"), run_ids, report_dir)
    table = Path(report["table"]).read_text()
    artifacts.markdown("proxy-experiment", table, "Recipe comparison")
    print(table)
    return report
