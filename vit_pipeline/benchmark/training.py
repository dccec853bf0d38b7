"""Training throughput on this machine, nanoGPT ``bench.py`` style.

For each preset x XLA (off/on) x precision (float32, mixed_bfloat16), in a fresh
child process (the precision policy is process-global): build the preset's model
and optimizer, warm up, then time ``steps`` train steps on one batch that is
already a tensor (compute only), and separately time the preset's input
pipeline (``train.make_dataset``: shuffle, batch augmentation, casting) over
the same number of batches (data only). The slower of the two bounds an epoch.

Run: ``vit-pipeline train-benchmark --output docs/benchmarks/training/report.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline.benchmark.child import report, run_child
from vit_pipeline.fsutil import write_text

MARKER = "TRAIN "

PRECISIONS = ("float32", "mixed_bfloat16")


@dataclass
class TrainingRow:
    preset: str
    xla: bool
    precision: str
    batch_size: int
    steps: int
    compute_ips: float | None = None  # images/s of the train step alone
    step_ms_p50: float | None = None
    data_ips: float | None = None  # images/s of the input pipeline alone
    compile_seconds: float | None = None  # first step (tracing, XLA compilation)
    params: int | None = None
    optimizer: str = "preset"  # "preset", or "finetune": the fine-tuning optimizer on the same model
    round: int = 0
    error: str | None = None


@dataclass
class TrainingReport:
    environment: dict[str, Any]
    results: list[TrainingRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def save_json(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> TrainingReport:
        raw = json.loads(Path(path).read_text())
        return cls(raw["environment"], [TrainingRow(**r) for r in raw["results"]], raw.get("settings", {}))

    def to_markdown(self) -> str:
        env = self.environment
        lines = [
            f"CPU: {env.get('cpu_model')} x{env.get('cpu_count')} ({', '.join(env.get('cpu_isa', [])) or '-'}); "
            f"tensorflow {env.get('versions', {}).get('tensorflow', '-')}; {self.settings.get('steps')} timed steps "
            f"after {self.settings.get('warmup')} warm-up steps",
            "",
            "| preset | optimizer | XLA | precision | batch | train step img/s | step p50 ms | "
            "input pipeline img/s | first step s | bound by |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            head = f"| {r.preset} | {r.optimizer} | {'on' if r.xla else 'off'} | {r.precision} | {r.batch_size} |"
            if r.error:
                lines.append(f"{head} failed: {r.error} | | | | |")
                continue
            bound = "compute" if r.compute_ips <= r.data_ips else "input pipeline"
            lines.append(
                f"{head} {r.compute_ips:.1f} | {r.step_ms_p50:.0f} | {r.data_ips:.0f} | {r.compile_seconds:.1f} | {bound} |"
            )
        if "steps_per_epoch" in self.settings:
            q = optimizer_ratios(self)
            lines += ["", f"Fine-tuning / preset optimizer, median of {q['rounds']} alternating rounds: first step "
                      f"{q['first_step']:.2f}x, step p50 {q['step_p50']:.2f}x, first epoch of "
                      f"{self.settings['steps_per_epoch']} steps {q['first_epoch']:.2f}x"]  # fmt: skip
        return "\n".join(lines) + "\n"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from vit_pipeline.config import make_config
    from vit_pipeline.model import build_vit
    from vit_pipeline.train import compile_model, make_dataset

    keras.mixed_precision.set_global_policy(spec["precision"])
    cfg = make_config(spec["preset"], spec.get("overrides"))
    bs, n_classes = cfg.batch_size, 100
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(4 * bs, 1024), cfg.input_size, cfg.input_size, 3), dtype=np.uint8)
    labels = rng.integers(0, n_classes, len(images)).astype(np.int32)
    model = build_vit(cfg, n_classes, images.shape[1:], train_images=images[:256])
    if spec["precision"] != "float32":  # logits back to float32 for the loss and metrics (Keras guide)
        logits = keras.layers.Activation("linear", dtype="float32")(model.outputs[0])
        model = keras.Model(model.inputs, logits)
    compile_model(model, cfg, n_classes, steps_per_epoch=100)
    model.jit_compile = spec["xla"]
    x, y = next(iter(make_dataset(images, labels, cfg, n_classes, training=True)))
    x, y = tf.constant(x), tf.constant(y)
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    compile_seconds = time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        model.train_on_batch(x, y)
    samples = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        samples.append(time.perf_counter() - t0)
    # The input pipeline alone, over as many batches, after one warm-up batch.
    ds = make_dataset(images, labels, cfg, n_classes, training=True).repeat()
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        next(it)
    data_seconds = time.perf_counter() - t0
    return {"compute_ips": bs / float(np.mean(samples)), "step_ms_p50": 1000 * float(np.median(samples)),
            "data_ips": bs * spec["steps"] / data_seconds, "compile_seconds": compile_seconds,
            "params": int(model.count_params()), "batch_size": bs}  # fmt: skip


def run_training_benchmark(presets: list[str], steps: int = 10, warmup: int = 3, xla: tuple[bool, ...] = (False, True),
                           precisions: tuple[str, ...] = PRECISIONS, timeout: float = 1200,
                           keep: TrainingReport | None = None) -> TrainingReport:  # fmt: skip
    """Every combination in its own child process; a failing one is a row with its error.

    Args:
        keep: An earlier report of the same settings whose successful rows are
            kept as they are (only missing or failed cells run again).
    """
    done = {(r.preset, r.xla, r.precision): r for r in (keep.results if keep else []) if not r.error}
    from vit_pipeline.benchmark.environment import environment
    from vit_pipeline.config import make_config

    rows = []
    for preset in presets:
        bs = make_config(preset).batch_size
        for use_xla in xla:
            for precision in precisions:
                if (preset, use_xla, precision) in done:
                    rows.append(done[(preset, use_xla, precision)])
                    continue
                spec = {
                    "preset": preset,
                    "xla": use_xla,
                    "precision": precision,
                    "steps": steps,
                    "warmup": warmup,
                }
                row = TrainingRow(preset, use_xla, precision, bs, steps)
                result = run_child(
                    ["-m", "vit_pipeline.benchmark.training", json.dumps(spec)], MARKER, timeout
                )
                row.error = result.pop("error", None)
                for key, value in result.items():
                    setattr(row, key, value)
                rows.append(row)
                print(f"{preset} xla={use_xla} {precision}: "
                      f"{row.error or f'{row.compute_ips:.1f} img/s (data {row.data_ips:.0f} img/s)'}", flush=True)  # fmt: skip
    env = environment()
    return TrainingReport(
        env, rows, {"steps": steps, "warmup": warmup, "data": "random uint8 images of input_size"}
    )


# The fine-tuning optimizer of presets/finetune.yaml: layer-wise rate decay and a head-only start
# (ScaledAdamW). Loading a checkpoint happens before training; what can make a fine-tuning epoch
# slower than a from-scratch one is this optimizer's graph, so it is what is compared.
FINETUNE_OPTIMIZER = {"layer_decay": 0.75, "linear_probe_epochs": 1}


def compare_finetune_optimizer(preset: str, rounds: int = 3, steps: int = 10, warmup: int = 3,
                               steps_per_epoch: int = 4, timeout: float = 1200) -> TrainingReport:  # fmt: skip
    """The preset's optimizer against the fine-tuning one, alternating, each child a fresh process.

    Alternating the pair in every round (A B, B A, ...) keeps a machine's drift out of
    the ratio. The first step (tracing) is what a first epoch adds to a later one.

    Args:
        steps_per_epoch: The epoch the first-epoch ratio is estimated for (4: the
            transfer experiment's 450 training images at batch 128).
    """
    from vit_pipeline.benchmark.environment import environment
    from vit_pipeline.config import make_config

    bs = make_config(preset).batch_size
    rows = []
    for index in range(rounds):
        order = ("preset", "finetune") if index % 2 == 0 else ("finetune", "preset")
        for optimizer in order:
            overrides = (
                FINETUNE_OPTIMIZER
                if optimizer == "finetune"
                else {"layer_decay": 1.0, "linear_probe_epochs": 0}
            )
            spec = {"preset": preset, "xla": False, "precision": "float32", "steps": steps, "warmup": warmup,
                    "overrides": overrides}  # fmt: skip
            row = TrainingRow(preset, False, "float32", bs, steps, optimizer=optimizer, round=index)
            result = run_child(["-m", "vit_pipeline.benchmark.training", json.dumps(spec)], MARKER, timeout)
            row.error = result.pop("error", None)
            for key, value in result.items():
                setattr(row, key, value)
            rows.append(row)
            figures = (
                row.error or f"first step {row.compile_seconds:.2f} s, step p50 {row.step_ms_p50:.0f} ms"
            )
            print(f"round {index} {optimizer}: {figures}", flush=True)
    settings = {"steps": steps, "warmup": warmup, "rounds": rounds, "steps_per_epoch": steps_per_epoch,
                "finetune_optimizer": FINETUNE_OPTIMIZER, "data": "random uint8 images of input_size"}  # fmt: skip
    return TrainingReport(environment(), rows, settings)


def optimizer_ratios(report: TrainingReport) -> dict[str, float]:
    """Median over rounds of fine-tuning / preset optimizer: first step, step p50, first epoch.

    The first epoch is estimated for one epoch of ``steps_per_epoch`` steps as first step
    plus the rest at p50 (the shape of a real first epoch: tracing, then steady steps).
    """
    by_round: dict[int, dict[str, TrainingRow]] = {}
    for r in report.results:
        if not r.error:
            by_round.setdefault(r.round, {})[r.optimizer] = r
    pairs = [(d["finetune"], d["preset"]) for d in by_round.values() if {"finetune", "preset"} <= set(d)]
    if not pairs:
        raise ValueError("Expected at least one round with both optimizers. Received: none without an error")
    steps = int(report.settings["steps_per_epoch"])

    def epoch(r: TrainingRow) -> float:
        return r.compile_seconds + (steps - 1) * r.step_ms_p50 / 1000

    return {
        "first_step": float(np.median([f.compile_seconds / p.compile_seconds for f, p in pairs])),
        "step_p50": float(np.median([f.step_ms_p50 / p.step_ms_p50 for f, p in pairs])),
        "first_epoch": float(np.median([epoch(f) / epoch(p) for f, p in pairs])),
        "rounds": len(pairs),
    }


if __name__ == "__main__":
    report(MARKER, _child(json.loads(sys.argv[1])))
