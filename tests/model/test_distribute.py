"""MirroredStrategy for real: the CPU split into two logical devices, in a fresh process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vit_pipeline.config import make_config
from vit_pipeline.errors import ConfigError

pytestmark = pytest.mark.integration  # real processes or servers: not in the fast tier

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    env = {**os.environ, "VIT_PIPELINE_LOGICAL_CPUS": "2", "VIT_PIPELINE_HOME": str(out / "home"),
           "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "tests.model.mirrored_run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_two_replicas_compute_the_same_step_as_one_device(mirrored):
    assert mirrored["logical_cpus"] == 2
    assert mirrored["sgd_max_abs_weight_diff"] < 1e-5


def test_mirrored_trainer_runs_two_replicas_resumes_and_logs_once(mirrored):
    run = mirrored["mirrored"]
    assert run["num_replicas"] == 2 and run["global_batch_size"] == 32  # 2 x per-replica 16
    assert mirrored["crash"] == "simulated crash after epoch 1"
    assert run["resumed_from_epoch"] == 1 and run["epochs_run"] == 3
    assert mirrored["mlflow_loss_steps"] == [1, 2, 3]  # once per epoch, not once per replica


def test_mirrored_training_matches_single_device_within_tolerance(mirrored):
    single, multi = mirrored["single"], mirrored["mirrored"]
    assert single["num_replicas"] == 1 and single["global_batch_size"] == 32
    for a, b in zip(single["loss"], multi["loss"], strict=True):
        assert abs(a - b) / a < 0.05
    assert multi["loss"][-1] < multi["loss"][0] and single["loss"][-1] < single["loss"][0]


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="distribution_strategy"):
        make_config("quickstart", {"distribution_strategy": "multi_worker"})


def test_logical_cpu_split_too_late_is_a_clear_error(monkeypatch):
    import tensorflow as tf

    from vit_pipeline.distribute import configure_logical_cpus

    tf.constant(1.0)  # TensorFlow has started in this process
    have = len(tf.config.list_logical_devices("CPU"))
    monkeypatch.setenv("VIT_PIPELINE_LOGICAL_CPUS", str(have + 1))
    with pytest.raises(ConfigError, match="before the process starts TensorFlow"):
        configure_logical_cpus()
