"""The ``benchmark-champion`` flow: export and benchmark the registry's live model, no training."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from vit_pipeline import progress, registry
from vit_pipeline.benchmark import stage as benchmark_stage
from vit_pipeline.benchmark.stage import BenchmarkOutcome
from vit_pipeline.flows import artifacts
from vit_pipeline.flows.train_pipeline import _prefect_tags, mark_mlflow_killed, tracking_was_down
from vit_pipeline.registry import Champion


def _store_was_away(task, task_run, state) -> bool:
    """Retry a registry that did not answer (``tracking_was_down``, or one it could not read), not "no
    champion yet" or a bug: they would give the same answer three times."""
    exc = state.result(raise_on_failure=False)
    return tracking_was_down(task, task_run, state) or isinstance(exc, registry.RegistryError)


@task(name="find-champion", retries=3, retry_delay_seconds=[5, 30, 60], retry_condition_fn=_store_was_away,
      cache_policy=NO_CACHE)  # fmt: skip
def find_champion(model_name: str, alias: str, tracking_uri: str | None) -> Champion:
    return registry.champion(model_name, alias, tracking_uri)


@task(name="export-and-benchmark", cache_policy=NO_CACHE)
def export_and_benchmark(champion: Champion, tracking_uri: str | None, options: dict) -> BenchmarkOutcome:
    result = benchmark_stage.run_champion(champion, tracking_uri, options, _prefect_tags())
    artifacts.table(
        "champion-benchmark", result.rows, f"{champion.name} v{champion.version}: Keras vs ONNX Runtime"
    )
    return result


@flow(name="benchmark-champion", log_prints=True, on_crashed=[mark_mlflow_killed],
      on_cancellation=[mark_mlflow_killed])  # fmt: skip
def benchmark_champion(
    model_name: str = "vit-cifar100",
    alias: str = "champion",
    tracking_uri: str | None = None,
    batch_sizes: list[int] | None = None,
    variants: str = "fp32,optimized,int8,fp16",
    providers: str | None = None,
    seconds: float = 1.0,
    rounds: int = 3,
) -> dict:
    """Benchmarks ``models:/<model_name>@<alias>`` (Keras baseline vs ONNX Runtime variants); with no
    champion yet (a fresh install before its first training) there is nothing to measure: it completes
    saying so, a schedule's run is not marked Failed for it."""
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    try:
        champion = find_champion(model_name, alias, tracking_uri)
    except registry.NoChampion as exc:
        print(f"Nothing to benchmark: {exc}")
        return {"benchmarked": False, "reason": str(exc)}
    options = {"batch_sizes": batch_sizes or [1, 8, 64, 256], "variants": variants, "providers": providers,
               "seconds": seconds, "rounds": rounds}  # fmt: skip
    result = export_and_benchmark(champion, tracking_uri, options)
    for line in result.ratios:
        print(line)
    return {"benchmarked": True, **result.to_dict(), "champion": champion.to_dict()}
