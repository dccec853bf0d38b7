"""Fine-tuning through the whole train_pipeline flow (real Prefect server, MLflow store, tf2onnx, ORT)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CIFAR_CUT
from tests.model.test_finetune import HUB, hf_checkpoint, randomise

pytestmark = pytest.mark.integration

QUIET = {"benchmark_batch_sizes": "1", "benchmark_seconds": 0.05, "benchmark_rounds": 1,
         "benchmark_variants": "fp32", "serve_candidates": "optimized", "max_train_images": 120}  # fmt: skip


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_hugging_face_folder_then_the_registered_model_carry_lineage(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from vit_pipeline.flows.train_pipeline import train_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hf, _ = hf_checkpoint(tmp_path / "hf-vit", mean=0.5)
    first = train_pipeline(preset="finetune", overrides={
        **QUIET, "data_path": str(CIFAR_CUT), "label_mode": "coarse", "tracking_uri": uri,
        "init_from": str(hf), "image_size": 48, "epochs": 2,  # 4x4 grid -> 6x6: interpolated
    })  # fmt: skip
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(first["mlflow_run_id"])
    p = run.data.params
    assert (p["backbone"], p["projection_dim"], p["image_size"], p["init.format"]) == (
        "keras_hub",
        "16",
        "48",
        "huggingface",
    )
    assert p["init.tensors_interpolated"] == "1" and p["init.tensors_new"] == "2" and p["init.head"] == "new"
    assert (
        run.data.tags["export.parity"] == "passed"
    )  # tf2onnx + ONNX Runtime agree on the Keras-Hub backbone
    # A Hugging Face folder does not record its training images: the lineage check says it could not run.
    assert run.data.tags["gate.lineage"].startswith(
        f"not checked: {hf} is not a model logged by this project"
    )
    v1 = client.get_model_version("vit-cifar100-coarse", first["registry"]["version"])
    assert v1.tags["init.source"] == str(hf) and v1.tags["init.source_digest"].startswith("sha256:")

    # The next model starts from the registered champion: lineage models:/vit-cifar100-coarse/1 -> vit-again/1.
    second = train_pipeline(preset="finetune", overrides={
        **QUIET, "data_path": str(CIFAR_CUT), "label_mode": "coarse", "registered_model_name": "vit-again", "tracking_uri": uri,
        "epochs": 2, "init_from": "models:/vit-cifar100-coarse@champion",
    })  # fmt: skip
    run2 = client.get_run(second["mlflow_run_id"])
    assert run2.data.params["init_from"] == f"models:/vit-cifar100-coarse/{v1.version}"  # pinned
    assert run2.data.params["image_size"] == "48"  # adopted from the checkpoint
    assert run2.data.params["init.tensors_interpolated"] == "0"
    # The same 20 classes, in the same order: the whole model is kept, head included.
    assert run2.data.params["init.head"] == "copied" and run2.data.params["init.tensors_new"] == "0"
    assert run2.data.tags["export.parity"] == "passed"
    v2 = client.get_model_version("vit-again", second["registry"]["version"])
    assert v2.tags["init.source"] == f"models:/vit-cifar100-coarse/{v1.version}"
    assert v2.tags["init.source_run_id"] == first["mlflow_run_id"]
    # Same data, same seed, same split: none of its test or validation images were the checkpoint's training
    # images. Its own checkpoint came from a Hugging Face folder, whose training images nobody recorded: the
    # check says it is partial (a gate tag of the version too).
    trained = int(run.data.params["data.train_size"])
    src = f"models:/vit-cifar100-coarse/{v1.version}"
    assert (
        v2.tags["gate.lineage"]
        == run2.data.tags["gate.lineage"]
        == (
            f"partly checked: 0 test and 0 validation images are exact or near copies of the {trained} images {src} was trained "
            f"on that are recorded (the training images of an ancestor of {src} are not recorded)"
        )
    )

    # The served ONNX file of the fine-tuned model answers without TensorFlow's help (the consumer's runtime).
    import onnxruntime as ort
    from mlflow.artifacts import download_artifacts
    from vit_consumer.mlflow_store import store_uris

    with store_uris(uri):
        folder = download_artifacts(
            artifact_uri=f"models:/vit-again/{v2.version}", dst_path=str(tmp_path / "v2")
        )
    onnx_file = next(Path(folder).rglob("*.onnx"))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": np.zeros((2, 32, 32, 3), np.float32)})[0]
    assert logits.shape == (2, 20) and np.isfinite(logits).all()


def test_keras_hub_preset_trains_and_a_mismatch_fails_before_training(prefect_server, tmp_path):
    import keras_hub
    from mlflow.tracking import MlflowClient

    from vit_pipeline.flows.train_pipeline import train_pipeline

    backbone = keras_hub.models.ViTBackbone(**HUB)
    randomise(backbone)
    preset = tmp_path / "hub"
    backbone.save_to_preset(str(preset))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_pipeline(preset="finetune", overrides={
        **QUIET, "data_path": str(CIFAR_CUT), "label_mode": "coarse", "tracking_uri": uri, "init_from": str(preset),
        "epochs": 3, "linear_probe_epochs": 1,
    })  # fmt: skip
    run = MlflowClient(tracking_uri=uri).get_run(result["mlflow_run_id"])
    assert run.data.params["init.tensors_copied"] == str(len(backbone.weights))
    assert run.data.params["init.format"] == "keras_hub_preset" and run.data.tags["export.parity"] == "passed"

    cli = subprocess.run(
        [sys.executable, "-m", "vit_pipeline.cli", "run", "--init-from", str(preset), "--projection-dim", "64",
         "--transformer-units", "128,64", "--tracking-uri", uri],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode != 0
    errors = [line for line in cli.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "Error: Expected projection_dim to match the checkpoint's"
    )
    assert "projection_dim=64," in errors[0] and "checkpoint projection_dim=16 " in errors[0]
    assert "Traceback" not in cli.stderr


def test_transfer_experiment_pretrains_then_compares_in_one_experiment(
    prefect_server, tiny_overrides, tmp_path
):
    from mlflow.tracking import MlflowClient

    from vit_pipeline.flows.transfer_experiment import transfer_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = {k: v for k, v in tiny_overrides.items() if k != "epochs"}
    result = transfer_experiment(
        data_path=str(CIFAR_CUT), work_dir=str(tmp_path / "split"), pretrain_epochs=1, epochs=2,
        target_classes=3, train_per_class=4, report_dir=str(tmp_path / "report"), tracking_uri=uri,
        overrides=tiny, pretrain_overrides={"rand_augment_ops": 1, "random_erasing": 0.25},
    )  # fmt: skip
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["from scratch (cifar100-improved-light)", "from scratch (cifar100)", "fine-tuned",
                      "pre-training (source classes)"]  # fmt: skip
    tuned = result["rows"][2]
    assert tuned["init_from"] == result["source"] and result["source"].startswith(
        "models:/vit-transfer-source/"
    )
    assert len(result["target_classes"]) == 3 and all(r["epochs"] == 2 for r in result["rows"][:3])
    table = (tmp_path / "report" / "table.md").read_text()
    best = max(result["rows"][:2], key=lambda r: r["test_accuracy"])  # a tie keeps the first
    assert f"- fine-tuned vs {best['label']}: **" in table  # the gain over the better from-scratch run
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("vit-transfer").experiment_id])
    assert {r.info.run_id for r in runs} == {r["run_id"] for r in result["rows"]}
    finetuned = client.get_run(tuned["run_id"])
    assert finetuned.data.params["init.head"] == "new" and finetuned.data.tags["export.parity"] == "passed"
    # The pre-training's own fields reach it alone: the from-scratch run of the same preset keeps its recipe.
    pretrained = client.get_run(result["rows"][3]["run_id"]).data.params
    scratch = client.get_run(result["rows"][0]["run_id"]).data.params
    assert (pretrained["rand_augment_ops"], pretrained["random_erasing"]) == ("1", "0.25")
    assert (scratch["rand_augment_ops"], scratch["random_erasing"]) == ("0", "0.0")
    # Other classes than the source's: none of the target's images were the checkpoint's training images.
    assert finetuned.data.tags["gate.lineage"].startswith(
        "passed: 0 test and 0 validation images are exact or near copies of"
    )


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--pretrain-set", "rand_augmnt=1"], "Error: Unknown config field 'rand_augmnt'"),
        (["--pretrain-set", "epochs=3"], "Error: --pretrain-set cannot set epochs: the experiment sets it"),
        (["--source", str(CIFAR_CUT)], "Error: --pretrain-set has no effect with --source"),
    ],
)
def test_transfer_experiment_refuses_pretraining_fields_it_cannot_use_in_one_line(tmp_path, extra, error):
    cli = subprocess.run(
        [sys.executable, "-m", "vit_pipeline.cli", "transfer-experiment", "--data-path", str(CIFAR_CUT),
         "--work-dir", str(tmp_path / "split"), "--pretrain-set", "rand_augment_ops=2", *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode != 0 and "Traceback" not in cli.stderr
    errors = [line for line in cli.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(error), errors
    assert not (tmp_path / "split").exists()  # nothing was split or trained
