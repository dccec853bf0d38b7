"""The ``transfer-experiment`` flow: fine-tuning against training from scratch, same budget.

1. Split CIFAR-100 by classes (``vit_pipeline.transfer_data``): the source task (90 classes, every
   image) and the target task (10 classes, ``train_per_class`` training images each, their own test
   images), as image folders. Or bring a target folder of your own (``target_folder``).
2. Pre-train on the source task (skipped when ``source`` names a checkpoint).
3. On the target task, with the same seed, epochs and data: fine-tune from the source model
   (``finetune`` preset), and train from scratch the pre-training preset (the best one) and the
   keras-io seed preset.
4. Optionally (``time_budget_minutes``) each of the three again for about that long.
5. Report from MLflow: test top-1 of each, the gain, first-epoch times, time-to-accuracy.

Every run lands in one MLflow experiment.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from vit_pipeline import progress, tracking
from vit_pipeline.config import make_config
from vit_pipeline.experiments import transfer_report
from vit_pipeline.flows import artifacts
from vit_pipeline.flows.train_pipeline import train_pipeline
from vit_pipeline.transfer_data import split_by_classes

# Short benchmark and no int8 candidates: the experiment compares accuracy, not runtimes.
QUIET = {
    "benchmark_variants": "fp32",
    "serve_candidates": "",
    "benchmark_batch_sizes": (1,),
    "benchmark_seconds": 0.2,
    "benchmark_rounds": 1,
}


@task(name="split-by-classes", cache_policy=NO_CACHE)
def split(data_path: str, work_dir: str, target_classes: int, train_per_class: int, seed: int) -> dict:
    s = split_by_classes(data_path, work_dir, target_classes, train_per_class, seed)
    return {"source": str(s.source_root), "target": str(s.target_root), "target_classes": s.target_classes}


@task(name="transfer-report", cache_policy=NO_CACHE)
def report(tracking_uri: str | None, groups: dict[str, dict[str, str]], report_dir: str) -> dict:
    cfg = make_config("quickstart", {"tracking_uri": tracking_uri})
    return transfer_report(tracking.client(cfg), groups, report_dir)


@flow(name="transfer-experiment", log_prints=True)
def transfer_experiment(
    data_path: str,
    work_dir: str = "vit-runs/transfer",
    source: str | None = None,
    target_folder: str | None = None,
    pretrain_preset: str = "cifar100-improved-light",
    pretrain_epochs: int = 15,
    pretrain_overrides: dict[str, Any] | None = None,
    seed_preset: str = "cifar100",
    epochs: int = 30,
    seed: int = 42,
    split_seed: int = 0,
    target_classes: int = 10,
    train_per_class: int = 50,
    experiment_name: str = "vit-transfer",
    report_dir: str = "docs/experiments/transfer",
    tracking_uri: str | None = None,
    time_budget_minutes: float | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pre-trains (unless ``source``), then fine-tunes and trains from scratch on the target; compares.

    Args:
        data_path: The CIFAR-100 copy (``cifar-100-python`` folder or ``.tar.gz``) to split or pre-train on.
        work_dir: Where the class-split image folders are written.
        source: A checkpoint to fine-tune from (any ``init_from``); None pre-trains one on the source classes.
        target_folder: Your own target image folder; None uses the held-out CIFAR-100 classes.
        pretrain_preset: Recipe of the pre-training and of the first from-scratch baseline (the best preset).
        seed_preset: Recipe of the second from-scratch baseline (the keras-io seed).
        pretrain_epochs: Pre-training epochs.
        pretrain_overrides: Further config fields of the pre-training only, e.g. ``{"rand_augment_ops": 2,
            "random_erasing": 0.25}``: augmentation makes a better source from 30 epochs on
            (docs/experiments.md), while the from-scratch baseline of the same preset keeps its recipe.
        epochs: Epochs of both target runs (the budget).
        seed: One seed for both target runs and the pre-training (initialisation, validation split, order).
        split_seed: Seed of the draw of target classes and of their training images.
        target_classes: Classes held out of pre-training for the target task.
        train_per_class: Training images per target class (all their test images are kept).
        experiment_name: The one MLflow experiment of every run.
        report_dir: Where ``table.md``, ``curves.png`` and ``runs.json`` go.
        tracking_uri: MLflow store (None: the pipeline's default).
        time_budget_minutes: Also train each approach for about this long (``max_train_minutes``) and
            report the top-1 reached after 5, 10 and 30 minutes (time-to-accuracy); None: skip.
        overrides: Further config fields for every run (e.g. a smaller architecture for a smoke test).
    """
    progress.quiet_libraries()  # a worker's flow run never goes through the CLI
    folders = split(data_path, work_dir, target_classes, train_per_class, split_seed)
    target = target_folder or folders["target"]
    common = {"seed": seed, "experiment_name": experiment_name, "tracking_uri": tracking_uri, **QUIET,
              **(overrides or {})}  # fmt: skip
    pretrain: dict[str, str] = {}
    if source is None:
        pre = train_pipeline(preset=pretrain_preset, overrides={
            **common, **(pretrain_overrides or {}), "dataset": "image_folder", "data_path": folders["source"],
            "dataset_name": "transfer-source", "epochs": pretrain_epochs, "run_name": f"pretrain-{pretrain_preset}",
        })  # fmt: skip
        pretrain["pre-training (source classes)"] = pre["mlflow_run_id"]
        source = f"models:/{pre['registry']['name']}/{pre['registry']['version']}"
    on_target = {**common, "dataset": "image_folder", "data_path": target, "dataset_name": "transfer-target"}
    approaches = {  # label -> (preset, extra values)
        f"from scratch ({pretrain_preset})": (pretrain_preset, {}),
        f"from scratch ({seed_preset})": (seed_preset, {}),
        "fine-tuned": ("finetune", {"init_from": source}),
    }
    runs = {
        label: train_pipeline(preset=preset, overrides={
            **on_target, **extra, "epochs": epochs, "run_name": label,
        })["mlflow_run_id"]
        for label, (preset, extra) in approaches.items()
    }  # fmt: skip
    groups = {f"{epochs} epochs": runs, **({"Pre-training": pretrain} if pretrain else {})}
    result = report(tracking_uri, groups, report_dir)
    if (
        time_budget_minutes
    ):  # time-to-accuracy: each approach for about that long, epochs sized from the above
        # Sized by the later epochs (the first one carries graph tracing), plus 10%: the budget, not the
        # epoch count, ends the run (max_train_minutes), with the schedule almost complete.
        epoch_seconds = {row["label"]: row["median_epoch_seconds"] for row in result["rows"]}
        timed = {
            f"{label}, {time_budget_minutes:g} min": train_pipeline(preset=preset, overrides={
                **on_target, **extra, "max_train_minutes": time_budget_minutes, "run_name": f"{label}, timed",
                "epochs": max(epochs, math.ceil(1.1 * 60 * time_budget_minutes / epoch_seconds[label])),
            })["mlflow_run_id"]
            for label, (preset, extra) in approaches.items()
        }  # fmt: skip
        groups = {f"{epochs} epochs": runs, f"{time_budget_minutes:g}-minute budget": timed,
                  **({"Pre-training": pretrain} if pretrain else {})}  # fmt: skip
        result = report(tracking_uri, groups, report_dir)
    table = Path(result["table"]).read_text()
    artifacts.markdown("transfer-experiment", table, "Fine-tuning vs scratch")
    print(table)
    return {**result, "source": source, "target": target, "target_classes": folders["target_classes"]}
