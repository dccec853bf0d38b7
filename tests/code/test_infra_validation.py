"""Infra validation: the real consumer, a separate process, serves the candidate before promotion."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import constant_classifier, real_images
from vit_pipeline import infra_validation, registry, runs, tracking
from vit_pipeline.config import make_config

pytestmark = pytest.mark.integration  # real consumer processes


def _with_metadata(src: Path, dst: Path, **props: str) -> Path:
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props} | props
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(dst))
    return dst


def test_a_real_export_is_served_and_answers_like_the_stage(tiny_export, tmp_path, monkeypatch):
    _, path, _ = tiny_export
    calibrated = _with_metadata(path, tmp_path / "calibrated.onnx", temperature="0.5")
    images = real_images(4)
    # A user's own inspect.py in the working directory broke the consumer's start (it was on its sys.path).
    shadow = tmp_path / "cwd"
    shadow.mkdir()
    (shadow / "inspect.py").write_text(
        "raise SystemExit('the working directory was on the consumer sys.path')\n"
    )
    monkeypatch.chdir(shadow)
    result = infra_validation.validate([path, calibrated], images, tmp_path, timeout=120)
    assert result.passed, result.reason
    assert result.checked == {"image/png": 8, "image/jpeg": 8, "application/json": 8, "application/x-npy": 8}
    assert result.outcome.startswith("passed: the consumer served 2 file(s) and answered 20 requests")


def test_a_file_onnx_runtime_loads_but_the_consumer_refuses_blocks_promotion(tmp_path):
    split_images = real_images(12)
    labels = np.arange(12) % 3
    split = registry.TestSplit(split_images, labels, ["a", "b", "c"], "d")
    good = constant_classifier(tmp_path / "good.onnx", 3, 0, ["a", "b", "c"])
    # Loads in ONNX Runtime (the export's parity check would pass), but its temperature is not > 0.
    bad = _with_metadata(good, tmp_path / "bad.onnx", temperature="0")
    from vit_pipeline.export import ort_session

    assert ort_session(bad).get_modelmeta().custom_metadata_map["temperature"] == "0"
    result = infra_validation.validate([bad], split_images[:4], tmp_path, timeout=120)
    assert not result.passed
    assert result.reason.startswith("bad.onnx: the consumer exited with 1: Error: ")
    assert "Expected a finite temperature > 0" in result.reason and "\n" not in result.reason

    # Through the stage's record: the version is registered, the alias does not move to it.
    cfg = make_config("quickstart", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    client = tracking.client(cfg)
    first = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(good), split)
    assert first.promoted
    run_id = runs.create_run(cfg, "test")
    client.set_tag(run_id, "gate.infra_validation", result.outcome)
    blocked = registry.register_onnx(cfg, run_id, str(bad), split)
    assert not blocked.promoted and blocked.reason.startswith("blocked by infra validation failed: bad.onnx")
    assert blocked.version == "2" and blocked.champion_version == "1"
    version = client.get_model_version(blocked.name, "2")
    assert version.tags["gate.infra_validation"] == result.outcome
    assert json.loads(json.dumps(result.to_dict()))["passed"] is False


def test_a_consumer_not_ready_in_time_is_stopped_and_the_shell_s_settings_are_not_used(
    tiny_export, tmp_path, monkeypatch
):
    _, path, _ = tiny_export
    server = infra_validation.ConsumerProcess(path, tmp_path / "slow.log", timeout=0.05)
    with pytest.raises(infra_validation.InfraValidationFailed, match="not ready within"), server:
        pass
    assert server.proc.poll() is not None  # not left serving in its own session

    # A VIT_* variable meant for another service changes nothing here (it made the consumer exit with 2).
    monkeypatch.setenv("VIT_MAX_BYTES", "not-a-size")
    result = infra_validation.validate([path], real_images(2), tmp_path, timeout=120)
    assert result.passed, result.reason


def test_the_consumer_under_validation_ends_with_a_sigkilled_pipeline(tiny_export, tmp_path):
    """``kill -9`` of the pipeline during infra validation left the consumer serving for good (its own session,
    PPID 1, its port held): it now gets the parent-death signal."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, path, _ = tiny_export
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom vit_pipeline.infra_validation import ConsumerProcess\n"
        f"with ConsumerProcess({str(path)!r}, Path({str(tmp_path / 'c.log')!r}), timeout=120) as server:\n"
        "    print(server.proc.pid, flush=True)\n    time.sleep(600)\n"
    )
    pipeline = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    consumer = None
    try:
        consumer = int(pipeline.stdout.readline())
        os.kill(pipeline.pid, signal.SIGKILL)
        pipeline.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(consumer) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(consumer), "the consumer outlived the SIGKILLed pipeline"
    finally:
        pipeline.kill()
        if consumer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(consumer, signal.SIGKILL)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
