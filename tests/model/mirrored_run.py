"""Run by test_distribute in a fresh process: TensorFlow must not have started yet.

Splits the CPU into two logical devices (``VIT_PIPELINE_LOGICAL_CPUS=2`` in the
environment) and prints a JSON summary of three checks:

1. Mechanics: one epoch of plain SGD on the pipeline's model and input pipeline,
   one device at global batch 2B against MirroredStrategy at 2 replicas x B.
   The per-replica batches, the all-reduce and the loss scaling must give the
   same weights (SGD is linear in the gradient, so they agree to float noise).
   The batches are not shuffled here: Keras' distributed path iterates a dataset
   once more than the single-device path (measured: 3 iterators for 2 epochs
   against 2), so a reshuffling pipeline hands it the next permutation - a
   different but equally valid order.
2. The real trainer (AdamW) under MirroredStrategy, logging to MLflow, crashed
   after its first epoch and resumed.
3. The real trainer on one device, to compare the loss curves. Adam turns float
   summation-order noise in near-zero gradients into lr-sized steps, so AdamW
   runs agree closely but not bitwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

from tests.conftest import CIFAR_CUT, TINY

# No random op inside the model (dropout, flips): both runs see identical steps.
DETERMINISTIC = {**TINY, "attention_dropout": 0.0, "mlp_dropout": 0.0, "head_dropout": 0.0,
                 "random_flip": "none", "random_rotation": 0.0, "random_zoom": 0.0, "epochs": 3,
                 "data_path": str(CIFAR_CUT), "label_mode": "coarse", "max_train_images": 256}  # fmt: skip
PER_REPLICA = 16


class CrashAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise RuntimeError("simulated crash after epoch 1")


def sgd_weights(cfg, splits, strategy, global_batch: int) -> list[np.ndarray]:
    from vit_pipeline.model import build_vit
    from vit_pipeline.train import make_dataset

    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = build_vit(cfg, splits.num_classes, splits.input_shape, train_images=splits.x_train)
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    ds = make_dataset(splits.x_train, splits.y_train, cfg, splits.num_classes, False, global_batch)
    model.fit(ds, epochs=1, verbose=0)
    return model.get_weights()


def main(out: Path) -> None:
    from vit_pipeline.distribute import configure_logical_cpus

    configure_logical_cpus()  # first thing: reading the data may start TensorFlow
    import tensorflow as tf

    from vit_pipeline import data, runs, tracking
    from vit_pipeline.config import make_config
    from vit_pipeline.train import train

    single = make_config("cifar100", {**DETERMINISTIC, "batch_size": 2 * PER_REPLICA})
    mirrored = make_config("cifar100", {**DETERMINISTIC, "batch_size": PER_REPLICA,
                                        "distribution_strategy": "mirrored"})  # fmt: skip
    splits = data.prepare(single)
    summary = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}

    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    one = sgd_weights(single, splits, tf.distribute.get_strategy(), 2 * PER_REPLICA)
    two = sgd_weights(single, splits, strategy, 2 * PER_REPLICA)
    summary["sgd_max_abs_weight_diff"] = max(
        float(np.abs(a - b).max()) for a, b in zip(one, two, strict=True)
    )

    run_id = runs.create_run(mirrored, "test")
    try:
        train(mirrored, splits, out / "mirrored", run_id=run_id, callbacks=[CrashAfterFirstEpoch()])
    except RuntimeError as exc:
        summary["crash"] = str(exc)
    results = {
        "mirrored": train(mirrored, splits, out / "mirrored", run_id=run_id),  # resumes after the crash
        "single": train(single, splits, out / "single"),
    }
    steps = [m.step for m in tracking.client(mirrored).get_metric_history(run_id, "loss")]
    summary["mlflow_loss_steps"] = sorted(steps)
    for name, r in results.items():
        history = json.loads(Path(r.history_path).read_text())
        summary[name] = {"num_replicas": r.num_replicas, "global_batch_size": r.global_batch_size,
                         "resumed_from_epoch": r.resumed_from_epoch, "epochs_run": r.epochs_run,
                         "loss": history["loss"]}  # fmt: skip
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
