"""prefect.yaml's pull step: the worker's VIT_PIPELINE_CHECKOUT names the checkout; without it, one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vit_pipeline.flows.steps import checkout

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("directory", ["", "{{ $VIT_PIPELINE_CHECKOUT }}", "/nonexistent", "/tmp"])
def test_a_deployment_without_its_checkout_fails_in_one_line(directory):
    with pytest.raises(RuntimeError) as err:
        checkout(directory)
    message = str(err.value)
    assert (
        message.startswith("Expected VIT_PIPELINE_CHECKOUT in the worker's environment to name its checkout")
        and "\n" not in message
    )
    assert "start the worker with VIT_PIPELINE_CHECKOUT=/path/to/checkout" in message


def test_prefect_reads_the_checkout_from_the_worker_s_environment_when_a_run_starts(monkeypatch, tmp_path):
    """Prefect's own step runner on prefect.yaml's pull step as stored (unresolved): the environment of the
    process that runs the flow decides (the docs said `prefect deploy` fixed it: a worker without the
    variable crashed every run)."""
    import asyncio

    import yaml
    from prefect.deployments.steps.core import run_steps
    from prefect.testing.utilities import prefect_test_harness

    (pull,) = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert pull == {"vit_pipeline.flows.steps.checkout": {"directory": "{{ $VIT_PIPELINE_CHECKOUT }}"}}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_PIPELINE_CHECKOUT", str(ROOT))
    # The runner resolves variables and blocks through the API: a server of the test's own, stopped after it
    # (the temporary one Prefect starts otherwise outlived the test process).
    with prefect_test_harness(server_startup_timeout=120):
        assert asyncio.run(run_steps([pull]))["directory"] == str(ROOT) and os.getcwd() == str(ROOT)


def test_the_checkout_is_entered(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert checkout(str(ROOT)) == {"directory": str(ROOT)} and os.getcwd() == str(ROOT)


def test_every_flow_quiets_what_libraries_print_under_a_worker(tmp_path):
    """A worker's flow run never goes through the CLI: TensorFlow's CUDA probe printed an ERROR line in every
    CPU worker's log and MLflow's download bars redrew there. Each flow sets the same defaults itself."""
    import importlib
    import inspect
    import pkgutil
    import subprocess
    import sys

    from prefect import Flow

    import vit_pipeline.flows as package

    flows = []
    for module in pkgutil.iter_modules(package.__path__):
        loaded = importlib.import_module(f"vit_pipeline.flows.{module.name}")
        flows += [
            obj
            for obj in vars(loaded).values()
            if isinstance(obj, Flow) and obj.fn.__module__ == loaded.__name__
        ]
    assert len(flows) >= 7
    for flow in flows:
        assert "progress.quiet_libraries()" in inspect.getsource(flow.fn), flow.name

    # One of them run as a worker runs it: nothing set beforehand, stderr not a terminal.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_DISABLE_TELEMETRY")}  # fmt: skip
    code = (
        "import os\nfrom vit_pipeline.flows.publish_serving import publish_serving\n"
        f"publish_serving.fn('models:/nothing@champion', {str(tmp_path / 's')!r}, "
        f"tracking_uri={'sqlite:///' + str(tmp_path / 'm.db')!r})\n"
        "print([os.environ.get(k) for k in ('TF_CPP_MIN_LOG_LEVEL', 'MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR', "
        "'MLFLOW_DISABLE_TELEMETRY')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from vit_consumer.contract import gpu_visible

    assert out.stdout.splitlines()[-1] == str(["2" if gpu_visible() else "3", "false", "true"])
