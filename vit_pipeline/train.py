"""Training: AdamW, sparse cross-entropy from logits, best-validation checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline import progress
from vit_pipeline.config import PipelineConfig
from vit_pipeline.data import Splits
from vit_pipeline.fsutil import atomic_path

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext

log = logging.getLogger(__name__)

MONITOR = "val_accuracy"


@dataclass
class TrainResult:
    """What training hands to later stages: paths and numbers, never the model."""

    model_path: str
    history_path: str
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    train_seconds: float  # this process only
    num_params: int
    resumed_from_epoch: int = 0  # epochs already done when this process started
    num_replicas: int = 1  # devices that trained in sync (MirroredStrategy)
    global_batch_size: int = 0
    init: dict[str, Any] | None = None  # finetune.InitReport.to_dict() when init_from is set
    time_budget_spent: bool = False  # stopped by max_train_minutes before the last epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STREAM_RAM_BUDGET = 256 * 2**20  # bytes tf.data's autotuning may buffer for a sharded split


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    cfg: PipelineConfig,
    num_classes: int,
    training: bool,
    batch_size: int | None = None,
):
    """tf.data pipeline: uint8 images (in memory or in shards), float32 batches of ``batch_size``.

    ``batch_size`` defaults to ``cfg.batch_size``; under a multi-replica strategy
    it is the global batch, which Keras splits across the replicas.

    Training batches are shuffled (seeded, anew each epoch) and augmented by the
    recipe's batch augmentation (``vit_pipeline.augment``); validation batches
    are only cast, with one-hot labels when the loss needs them.
    """
    import tensorflow as tf

    from vit_pipeline.augment import batch_augmenter, model_batch
    from vit_pipeline.shards import ShardedImages, dataset

    if isinstance(x, ShardedImages):  # streamed shard by shard: memory does not grow with the folder
        ds = dataset(x, y, cfg.seed, shuffle=training)
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if training:
            ds = ds.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True)
    augment = batch_augmenter(cfg, num_classes) if training else None

    def cast(images, labels):
        return model_batch(images, labels, cfg, num_classes)

    ds = ds.batch(batch_size or cfg.batch_size).map(augment or cast, num_parallel_calls=tf.data.AUTOTUNE)
    if isinstance(x, ShardedImages):
        # A fixed number of batches ahead: AUTOTUNE may grow its buffers towards half the RAM.
        options = tf.data.Options()
        options.autotune.ram_budget = STREAM_RAM_BUDGET
        return ds.prefetch(2).with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def learning_rate(cfg: PipelineConfig, steps_per_epoch: int):
    """The seed's constant rate, or linear warm-up then cosine decay to 0.

    The schedule is a function of the optimizer's step counter, which
    ``BackupAndRestore`` restores, so a resumed run continues the same curve.
    """
    import keras

    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_fraction * total))
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warmup), warmup_target=cfg.learning_rate, warmup_steps=warmup
    )


def compile_model(model, cfg: PipelineConfig, num_classes: int, steps_per_epoch: int = 1) -> None:
    """AdamW with Keras weight-decay semantics (see PipelineConfig), top-1 and top-5.

    Hard labels use the seed's sparse cross-entropy; label smoothing, MixUp and
    CutMix need one-hot labels, with the same metric names.
    """
    import keras

    k = min(5, num_classes)
    if cfg.soft_labels:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)
        metrics = [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=k, name="top5_accuracy"),
        ]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top5_accuracy"),
        ]
    optimizer = make_optimizer(model, cfg, steps_per_epoch)
    if cfg.weight_decay_scope == "kernels":  # before the optimizer is built
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


def make_optimizer(model, cfg: PipelineConfig, steps_per_epoch: int):
    """AdamW; with layer-wise rate decay or a head-only start, the per-variable ``ScaledAdamW``."""
    import keras

    from vit_pipeline.optimizer import ScaledAdamW, rate_scales

    rate = learning_rate(cfg, steps_per_epoch)
    if cfg.layer_decay == 1.0 and cfg.linear_probe_epochs == 0:
        return keras.optimizers.AdamW(learning_rate=rate, weight_decay=cfg.weight_decay)
    return ScaledAdamW(
        rate_scales=rate_scales(model.trainable_variables, cfg.transformer_layers, cfg.layer_decay),
        frozen_steps=cfg.linear_probe_epochs * steps_per_epoch,
        learning_rate=rate,
        weight_decay=cfg.weight_decay,
    )


NO_DECAY_NAMES = ("position_embedding", "class_token")


def no_decay_variables(model) -> list:
    """What DeiT/timm keep out of weight decay: 1-D and scalar weights, position embeddings, class token.

    1-D and scalar: Dense and attention biases, LayerNorm scales and offsets,
    LSA's (log) temperature. By name: the position embedding table and the class
    token, which are 2-D and 3-D but are embeddings, not kernels.
    """
    return [
        v for v in model.trainable_variables if len(v.shape) <= 1 or any(n in v.path for n in NO_DECAY_NAMES)
    ]


class EpochLog:
    """Per-epoch metrics in ``epochs.jsonl``: the history that survives a crash.

    One JSON line per finished epoch; on resume, a line for an epoch that is
    trained again is superseded by the newer one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[int, dict[str, float]]:
        if not self.path.exists():
            return {}
        epochs: dict[int, dict[str, float]] = {}
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            epochs[int(record.pop("epoch"))] = record
        return epochs

    def append(self, epoch: int, logs: dict[str, Any]) -> None:
        record = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> dict[str, list[float]]:
        epochs = self.read()
        keys = sorted({k for rec in epochs.values() for k in rec})
        return {k: [epochs[e].get(k, float("nan")) for e in sorted(epochs)] for k in keys}


def read_best(path: Path) -> dict | None:
    """``{"epoch": 0-based, "value": val_accuracy}`` of the weights in ``best.weights.h5``, if any."""
    meta = path.with_name("best.json")
    if not meta.exists() or not path.exists():
        return None
    return json.loads(meta.read_text())


def backup_callback(backup_dir: Path):
    """Keras' ``BackupAndRestore``, keeping its backup until the caller removes it.

    Keras deletes the backup when ``fit`` returns; a crash before ``model.keras``
    and the result file are written would then retrain from scratch. The
    callback's ``restored_epoch`` is the epoch this process really started from
    (the exact ``resumed_from_epoch``).
    """
    import keras

    class Backup(keras.callbacks.BackupAndRestore):
        restored_epoch = 0

        def _pairs(self) -> tuple[tuple[str, str], ...]:
            """Each backup file and its copy of the epoch before."""
            return ((self._weights_path, self._prev_weights_path),
                    (self._training_metadata_path, self._prev_training_metadata_path))  # fmt: skip

        def on_train_begin(self, logs=None):
            try:
                super().on_train_begin(logs)  # falls back to the previous epoch's copy on an OSError only
            except ValueError:
                # A readable file that misses layers: a save cut short before saves were atomic. The previous
                # epoch's copy is whole (Keras' own fallback, for the error it does not catch).
                if not os.path.exists(self._prev_weights_path):
                    raise
                log.warning("The backup in %s is incomplete: resuming from the epoch before it", backup_dir)
                for latest, previous in self._pairs():
                    if os.path.exists(previous):
                        _copy_atomically(previous, latest)
                self._load_model()
            self.restored_epoch = int(getattr(self.model, "_initial_epoch", 0) or 0)

        def _save_model(self):
            """Keras' save, each file written whole or not at all: a SIGTERM (a cancelled flow run) during
            ``save_weights`` left a readable file with some layers missing, and every resume failed on it."""
            os.makedirs(self.backup_dir, exist_ok=True)
            for latest, previous in self._pairs():
                if os.path.exists(latest):  # the last whole epoch, kept while this one is written
                    _copy_atomically(latest, previous)
            with atomic_path(self._weights_path, suffix=".weights.h5") as tmp:
                self.model.save_weights(str(tmp), overwrite=True)
            # After the weights: a crash between the two leaves the older epoch number, and that epoch trains
            # once more from the newer weights, never the other way round.
            with atomic_path(self._training_metadata_path) as tmp:
                tmp.write_text(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))

    return Backup(str(backup_dir), double_checkpoint=True, delete_checkpoint=False)


def _copy_atomically(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _callbacks(cfg: PipelineConfig, out_dir: Path, run_id: str | None, epoch_log: EpochLog):
    """Rate, best checkpoint, epoch log + MLflow, and the backup, in that order.

    The best checkpoint comes before the epoch log, so whatever the log, MLflow or
    the result call "best" has its weights on disk (``best.json`` names the epoch
    and value of ``best.weights.h5``). The backup comes last, so that once it
    says "epoch N is done" everything else already holds epoch N; a crash costs
    at most the epoch in progress.
    """
    import keras

    from vit_pipeline import tracking

    mlflow_run = tracking.RunLogger.open(cfg, run_id) if run_id else None
    best = read_best(out_dir / "best.weights.h5")
    if best is not None:
        log.info("Resuming: best %s so far %.4f (epoch %d)", MONITOR, best["value"], best["epoch"] + 1)

    class Bookkeeping(keras.callbacks.Callback):
        """Epoch log first (the truth on disk), then MLflow if it answers.

        A tracking server that went away never stops training: the epoch stays in
        ``epochs.jsonl`` and is sent with the next epoch MLflow answers for, at the
        end of training, or on ``--resume``. ``sync_epochs`` sends only the steps
        MLflow lacks, so an epoch trained again after a crash keeps its first
        value and every step has exactly one.
        """

        def on_epoch_end(self, epoch, logs=None):
            epoch_log.append(epoch, logs or {})
            if mlflow_run is None:
                return
            if not tracking.server_up(cfg):
                log.warning("MLflow unreachable; epoch %d kept in %s for later", epoch, epoch_log.path)
                return
            try:
                mlflow_run.sync_epochs(epoch_log.read())
            except Exception as exc:  # server dropped mid-request; keep training
                log.warning("MLflow logging failed (%s); epochs kept in %s", exc, epoch_log.path)

    class BestWeights(keras.callbacks.Callback):
        """Best-validation weights, then their ``best.json``; each written atomically."""

        def __init__(self, path: Path, best: float | None):
            super().__init__()
            self.path, self.best = path, best

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(MONITOR)
            if value is None or (self.best is not None and value <= self.best):
                return
            self.best = float(value)
            with atomic_path(self.path, suffix=".weights.h5") as tmp:  # Keras wants that ending
                self.model.save_weights(str(tmp), overwrite=True)
            # A crash between the two renames leaves new weights with the old
            # best.json: on resume the next better epoch overwrites both.
            with atomic_path(self.path.with_name("best.json")) as meta:
                meta.write_text(json.dumps({"epoch": epoch, "value": self.best}))

    class LearningRate(keras.callbacks.Callback):
        """Adds the rate the epoch ended with, and the epoch's wall time (training and validation), to its
        logs: the MLflow curves of the schedule and of time-to-accuracy."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                opt = self.model.optimizer
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(opt.learning_rate))
                logs["epoch_seconds"] = time.perf_counter() - self.started

    class TimeBudget(keras.callbacks.Callback):
        """Stops after the epoch that passes ``max_train_minutes`` (counting epochs before a resume too)."""

        def on_epoch_end(self, epoch, logs=None):
            spent = sum(rec.get("epoch_seconds", 0.0) for rec in epoch_log.read().values())
            if cfg.max_train_minutes is not None and spent >= 60 * cfg.max_train_minutes:
                log.info(
                    "Time budget of %.1f min spent after epoch %d; stopping", cfg.max_train_minutes, epoch + 1
                )
                self.model.stop_training = True

    checkpoint = BestWeights(out_dir / "best.weights.h5", None if best is None else best["value"])
    # TimeBudget after the epoch log (it reads the epoch just written), before the backup.
    return [LearningRate(), checkpoint, Bookkeeping(), TimeBudget(), backup_callback(out_dir / "backup")]


def _finished(cfg: PipelineConfig, out_dir: Path) -> TrainResult | None:
    """The result of a training that already completed in ``out_dir``, if any."""
    result_path = out_dir / "train_result.json"
    if not result_path.exists() or not (out_dir / "model.keras").exists():
        return None
    result = TrainResult(**json.loads(result_path.read_text()))
    if result.epochs_run != cfg.epochs and not result.time_budget_spent:
        return None
    log.info("Training already completed in %s; not training again", out_dir)
    return TrainResult(**{**result.to_dict(), "resumed_from_epoch": result.epochs_run, "train_seconds": 0.0})


def train(
    cfg: PipelineConfig,
    splits: Splits,
    out_dir: str | Path,
    run_id: str | None = None,
    callbacks: list | None = None,
    on_init: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Trains the ViT; restores the best-validation-accuracy weights at the end.

    Args:
        cfg: Pipeline config (architecture and recipe).
        splits: Prepared data.
        out_dir: Where the checkpoint, final model and history are written.
        run_id: MLflow run that receives per-epoch metrics, if any.
        callbacks: Extra Keras callbacks, run after the backup of each epoch.
        on_init: Called with the ``finetune.InitReport`` (a model with ``init_from``) before the first
            epoch: the run says where its weights came from while it trains, not only once it finished.

    Returns:
        Paths of the saved ``.keras`` model and history JSON, and summary numbers.

    Called again with the same ``out_dir`` after a crash, it resumes from the last
    finished epoch (weights, optimizer state, epoch counter, best-so-far).

    Raises:
        TrainingInProgress: another process is training ``out_dir`` right now.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir):
        return _train(cfg, splits, out_dir, run_id, callbacks, on_init)


@contextlib.contextmanager
def exclusive(out_dir: Path):
    """Holds an exclusive lock on a run's work directory while it trains.

    A second trainer of the same run (a flow run orphaned by a dead worker beside
    its resume, or two ``--resume`` of one run) would interleave epochs in the
    checkpoints and in MLflow; it is refused instead. The kernel drops the lock
    when the holder dies, so a crash never leaves the run locked.

    Raises:
        TrainingInProgress: another live process holds the lock.
    """
    import fcntl
    import socket

    from vit_pipeline.errors import TrainingInProgress

    lock = open(out_dir / ".train.lock", "a+")  # noqa: SIM115 (held for the whole block)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise TrainingInProgress(
            f"{out_dir} is being trained right now by {holder}; stop that process before resuming this run"
        ) from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


INIT_RECORD = "init.json"  # in the run's work dir: where its weights first came from


def _first_init(out_dir: Path, init):
    """Where the run's weights came from: on a resume from its own backup, the first attempt's record.

    The backup, not ``init_from``, gives a resumed run its weights, and the checkpoint may have changed
    since (a file rewritten, a folder edited): the record of what it was then stays the truth.
    """
    from vit_pipeline.finetune import InitReport

    if init is None:
        return None
    record = out_dir / INIT_RECORD
    whole_epoch = (out_dir / "backup" / "latest.weights.h5").is_file()  # not a save's temporary file
    if record.is_file() and whole_epoch:
        first = InitReport.from_dict(json.loads(record.read_text()))
        if first.source.digest != init.source.digest:
            log.warning("init_from %s changed since this run started (%s then, %s now); it resumes from its own "
                        "backup and records the first", init.source.uri, first.source.digest, init.source.digest)  # fmt: skip
        return first
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(init.to_dict(), indent=1))
    return init


def _train(cfg: PipelineConfig, splits: Splits, out_dir: Path, run_id: str | None, callbacks: list | None,
           on_init: Callable[[Any], None] | None = None):  # fmt: skip
    import keras

    from vit_pipeline.distribute import make_strategy
    from vit_pipeline.finetune import build_model

    finished = _finished(cfg, out_dir)
    if finished is not None:  # resumed after training completed (e.g. MLflow was down at the end)
        return finished
    strategy = make_strategy(cfg)  # before any TensorFlow op: it may split the CPU
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    log.info(
        "Training on %d replica(s) (%s), global batch %d", replicas, cfg.distribution_strategy, global_batch
    )
    keras.utils.set_random_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(splits.x_train) / global_batch)
    with strategy.scope():  # variables (model and optimizer) are mirrored on every replica
        model, init = build_model(cfg, splits)  # fresh, or from init_from's checkpoint
        compile_model(model, cfg, splits.num_classes, steps_per_epoch)
    init = _first_init(out_dir, init)
    if init is not None and on_init is not None:
        on_init(init)
    if init is not None:
        log.info(
            "Initialised from %s: %d tensors copied, %d interpolated, %d new (head %s)", init.source.uri,
            len(init.copied), len(init.interpolated), len(init.new), init.head,
        )  # fmt: skip
    best_path = out_dir / "best.weights.h5"
    epoch_log = EpochLog(out_dir / "epochs.jsonl")
    own = _callbacks(cfg, out_dir, run_id, epoch_log)
    backup = own[-1]
    train_ds = make_dataset(splits.x_train, splits.y_train, cfg, splits.num_classes, True, global_batch)
    val_ds = make_dataset(splits.x_val, splits.y_val, cfg, splits.num_classes, False, global_batch)
    shown = progress.keras_callback(cfg.epochs, steps_per_epoch)
    start = time.perf_counter()
    # shuffle=False: the tf.data pipeline already shuffles (seeded) each epoch. verbose=0: the
    # progress callback draws a bar on a terminal and prints one line per epoch.
    try:
        model.fit(
            train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=[*own, *(callbacks or []), shown],
            verbose=0, shuffle=False,
        )  # fmt: skip
    finally:
        shown.close()
    seconds = time.perf_counter() - start
    hist = epoch_log.history()  # every epoch, also those before a crash
    best = read_best(best_path)
    if best is None:
        raise RuntimeError(f"Training ended without a best checkpoint in {out_dir} ({MONITOR} never logged)")
    model.load_weights(str(best_path))
    model_path = out_dir / "model.keras"
    with atomic_path(model_path) as tmp:
        model.save(tmp)
    history_path = out_dir / "history.json"
    with atomic_path(history_path) as tmp:
        tmp.write_text(json.dumps(hist, indent=1))
    log.info("Best %s %.4f at epoch %d", MONITOR, best["value"], best["epoch"] + 1)
    result = TrainResult(
        model_path=str(model_path),
        history_path=str(history_path),
        best_epoch=int(best["epoch"]),
        best_val_accuracy=float(best["value"]),
        epochs_run=len(hist[MONITOR]),
        train_seconds=seconds,
        num_params=int(model.count_params()),
        resumed_from_epoch=backup.restored_epoch,
        num_replicas=replicas,
        global_batch_size=global_batch,
        init=None if init is None else init.to_dict(),
        time_budget_spent=len(hist[MONITOR]) < cfg.epochs,
    )
    with atomic_path(out_dir / "train_result.json") as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1))
    # Only now is the backup no longer needed: model.keras and the result file say "done".
    shutil.rmtree(out_dir / "backup", ignore_errors=True)
    return result


# --------------------------------------------------------------------- the stage
KERAS_MODEL_TAG = "train.keras_model_uri"


def run(ctx: StageContext, data_path: str) -> TrainResult:
    """The training stage: trains (or resumes), logs per-epoch metrics, the best epoch and the Keras model.

    Raises:
        TrackingUnavailable: training finished but MLflow is away (a retry only uploads).
    """
    cfg = ctx.cfg
    splits = Splits.load(data_path)
    out = ctx.work_dir
    result = train(
        cfg, splits, out, run_id=ctx.run_id, on_init=lambda report: _log_init(ctx, report, early=True)
    )
    _sync_or_fail(ctx, out, result.model_path)
    trained_now = result.epochs_run - result.resumed_from_epoch
    ctx.log.metrics({
        "best_val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch + 1,
        "train_seconds": result.train_seconds,
        "train_images_per_second": len(splits.y_train) * trained_now / max(result.train_seconds, 1e-9),
        "resumed_from_epoch": result.resumed_from_epoch,
        # Metrics, not params: a resumed run may train on another device count.
        "num_replicas": result.num_replicas,
        "global_batch_size": result.global_batch_size,
    })  # fmt: skip
    ctx.log.tags({"train.distribution": f"{cfg.distribution_strategy} x{result.num_replicas}"})
    ctx.log.params({"num_params": result.num_params})
    if result.init:  # again: the early record is best effort (MLflow may have been away then)
        from vit_pipeline.finetune import InitReport

        _log_init(ctx, InitReport.from_dict(result.init))
    ctx.log.artifacts([result.history_path], "training")
    if KERAS_MODEL_TAG not in ctx.log.run().data.tags:  # a resume logs it once
        _log_keras_model(ctx, result.model_path, splits.x_test[:2])
    return result


def _log_init(ctx: StageContext, report, early: bool = False) -> None:
    """Where the first weights came from: tags for lineage and the whole report; params to compare runs by
    only once trained (params cannot change, and a resume before the first backup starts again from the
    checkpoint as it is then: ``_first_init``)."""
    try:
        ctx.log.tags(report.tags())
        ctx.log.dict(report.to_dict(), "training/init.json")
        if not early:
            ctx.log.params(report.params())
    except Exception as exc:
        if not early:
            raise
        log.warning("Could not record init_from in MLflow before training (recorded after it): %s", exc)


def _log_keras_model(ctx: StageContext, model_path: str, example: np.ndarray) -> None:
    """The trained model in MLflow with its signature; its URI as a run tag."""
    import mlflow

    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.mlflow_models import log_keras_model
    from vit_pipeline.model import load_model

    model = load_model(model_path)
    example = example.astype(np.float32)
    signature = mlflow.models.infer_signature(example, predict_logits(model, example))
    info = log_keras_model(ctx.cfg, ctx.run_id, model, signature)
    ctx.log.tags({KERAS_MODEL_TAG: info.model_uri})


def _sync_or_fail(ctx: StageContext, out: Path, model_path: str) -> None:
    """Sends epochs MLflow missed while it was away; fails clearly if it is still away."""
    from vit_pipeline import tracking
    from vit_pipeline.errors import TrackingUnavailable

    epochs = EpochLog(out / "epochs.jsonl").read()
    try:
        tracking.check_reachable(ctx.cfg)
        sent = ctx.log.sync_epochs(epochs)
    except Exception as exc:
        raise TrackingUnavailable(
            f"Training finished (model: {model_path}; per-epoch metrics: {out / 'epochs.jsonl'}) but MLflow at "
            f"{tracking.tracking_uri(ctx.cfg)} is unreachable; rerun with --resume {ctx.run_id} to upload without "
            "training again"
        ) from exc
    if sent:
        log.warning("Sent epochs %s to MLflow after it was away", sent)
