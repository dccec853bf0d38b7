"""prefect.yaml on real services: Prefect server, MLflow server, a process worker.

Everything runs as separate processes on free localhost ports and is torn down
afterwards. This is the "Run it on a schedule" path of the README, end to end.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, start_group, stop_group, wait_for_http

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEARTBEAT = 30  # seconds between flow-run heartbeats in this test: the least Prefect accepts
# Workers as deploy/local.sh starts them; the health server's port comes from the environment.
WORKER = [str(BIN / "prefect"), "worker", "start", "--pool", "vit-pipeline", "--with-healthcheck"]


def _start(cmd, env, log):
    return start_group(cmd, env, log, REPO)


_stop = stop_group


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # see tests/conftest.py
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # default 10: each flow run waited for the next poll
        "PREFECT_WORKER_WEBSERVER_PORT": str(free_port()),  # --with-healthcheck's server
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "VIT_PIPELINE_HOME": str(root / "vit"),
        "VIT_PIPELINE_CHECKOUT": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    logs = {name: open(root / f"{name}.log", "w") for name in ("prefect", "mlflow", "worker")}  # noqa: SIM115
    procs = [
        _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
               env, logs["prefect"]),
        _start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"), "--workers", "1"], env, logs["mlflow"]),
    ]  # fmt: skip
    try:
        wait_for_http(f"{env['PREFECT_API_URL']}/health", procs[0], timeout=120)
        wait_for_http(f"{env['MLFLOW_TRACKING_URI']}/health", procs[1], timeout=120)
        yield env, procs, logs, root
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for f in logs.values():
            f.close()


def _kill_flow_runs(root: Path) -> None:
    """SIGKILLs this test's Prefect worker and flow-run processes (never the servers).

    The process worker may start a flow run in its own session, so stopping the
    worker's process group alone can leave the training running.
    """
    marker = f"VIT_PIPELINE_HOME={root / 'vit'}".encode()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            continue
        is_server = b"server" in cmdline or b"mlflow" in cmdline or b"uvicorn" in cmdline
        if (
            marker in environ
            and b"prefect" in cmdline
            and not is_server
            and int(proc_dir.name) != os.getpid()
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc_dir.name), signal.SIGKILL)


def _cli(args, env, timeout=300):
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_deploy_schedule_worker_crash_and_resume(services):
    """prefect.yaml deployed; a smoke run whose worker dies mid-training; a new run resumes and registers it.

    One flow run serves both checks (deployment and crash recovery): each full flow run on
    2 CPU cores costs most of a minute of CI.
    """
    from mlflow.tracking import MlflowClient

    env, procs, logs, root = services
    _cli(["work-pool", "create", "vit-pipeline", "--type", "process"], env)
    _cli(["--no-prompt", "deploy", "--all"], env)

    api = env["PREFECT_API_URL"]
    deployments = httpx.post(f"{api}/deployments/filter", json={}).json()
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {
        "nightly-cifar100",
        "quickstart-smoke",
        "weekly-champion-benchmark",
        "monthly-recipe-sweep",
        "publish-serving",
        "end-crashed-runs",
    }
    # Every scheduled flow run sends heartbeats (Prefect's zombie detection reads them).
    for name in (
        "nightly-cifar100",
        "quickstart-smoke",
        "weekly-champion-benchmark",
        "monthly-recipe-sweep",
        "publish-serving",
    ):
        assert by_name[name]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60", name
    # A scheduled run that finds the previous one running is cancelled, not piled up behind it.
    for name in ("nightly-cifar100", "weekly-champion-benchmark", "monthly-recipe-sweep", "publish-serving"):
        assert by_name[name]["global_concurrency_limit"]["limit"] == 1, name
        assert by_name[name]["concurrency_options"]["collision_strategy"] == "CANCEL_NEW", name
    assert by_name["quickstart-smoke"]["pull_steps"] == [
        {"vit_pipeline.flows.steps.checkout": {"directory": str(REPO)}}
    ]
    # The set-up command: the zombie automation (heartbeats every HEARTBEAT s here, the minimum) and the
    # one that ends a crashed flow run's MLflow runs.
    created = json.loads(subprocess.run(
        [str(BIN / "vit-pipeline"), "automations", "--heartbeat-seconds", str(HEARTBEAT), "--missed", "2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout)  # fmt: skip
    assert len(created) == 2
    (nightly,) = by_name["nightly-cifar100"]["schedules"]
    assert nightly["schedule"]["cron"] == "0 1 * * *" and nightly["schedule"]["timezone"] == "Europe/Berlin"
    assert by_name["nightly-cifar100"]["parameters"]["preset"] == "cifar100"
    assert by_name["quickstart-smoke"]["schedules"] == []
    assert by_name["weekly-champion-benchmark"]["schedules"][0]["schedule"]["cron"] == "0 3 * * 0"
    sweep = by_name["monthly-recipe-sweep"]
    assert sweep["schedules"][0]["schedule"]["cron"] == "0 2 1 * *"
    assert sweep["parameters"]["space_path"] == "sweeps/cifar100-improved.yaml"
    assert all(d["work_pool_name"] == "vit-pipeline" for d in deployments)
    _typed_parameters_are_enforced_by_the_server(api, by_name["quickstart-smoke"])

    epochs = 10
    config = {
        "epochs": epochs,
        # Short epochs (a fraction of a second): the kill still lands mid-training, the resume is quick.
        "max_train_images": 300,
        "max_test_images": 100,
        "benchmark_batch_sizes": [1, 8],
        "benchmark_variants": "fp32,optimized",
        "serve_candidates": "optimized",  # int8 candidates: tests/code/test_flow.py
        "benchmark_seconds": 0.05,
        "benchmark_rounds": 1,
    }
    worker = _start(WORKER, env, logs["worker"])
    # The typed parameter, as the UI's form sends it; heartbeats at the shortest period Prefect allows.
    out = _cli(
        ["deployment", "run", "train-pipeline/quickstart-smoke", "--param", f"config={json.dumps(config)}",
         "--job-variable", f"env={json.dumps({'PREFECT_FLOWS_HEARTBEAT_FREQUENCY': str(HEARTBEAT)})}"],
        env,
    )  # fmt: skip
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    deadline, meta = time.monotonic() + 300, None
    while time.monotonic() < deadline and meta is None:
        for path in (root / "vit" / "work").glob("*/backup/training_metadata.json"):
            try:
                if json.loads(path.read_text())["epoch"] >= 2:
                    meta = path
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.1)
    assert meta is not None, "training never reached epoch 2"
    # A worker's machine going down takes its flow runs with it (killed first: the flow run,
    # in its own session, would train on while the worker shuts down).
    _kill_flow_runs(root)
    killed_at = time.monotonic()
    _stop(worker)
    run_id = meta.parents[1].name
    done = len((meta.parents[1] / "epochs.jsonl").read_text().splitlines())
    assert 2 <= done < epochs
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])  # through the server's HTTP API
    assert client.get_run(run_id).info.status == "RUNNING"  # no hook ran: its process was SIGKILLed

    # Another host's worker. Prefect's automation marks the silent flow run Crashed; the Crashed event runs
    # end-crashed-runs on this worker, which ends its MLflow run KILLED: within 3 heartbeat periods.
    worker = _start(WORKER, env, logs["worker"])
    procs.append(worker)
    state, status = None, None
    while time.monotonic() - killed_at < 3 * HEARTBEAT + 30 and status != "KILLED":
        time.sleep(1)
        state = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()["state"]
        status = client.get_run(run_id).info.status
    elapsed = time.monotonic() - killed_at
    assert state["type"] == "CRASHED" and "No heartbeat for 2 x 30 s" in state["message"], state
    assert status == "KILLED", f"MLflow run {status} {elapsed:.0f} s after the SIGKILL"
    assert elapsed <= 3 * HEARTBEAT, f"Crashed and KILLED after {elapsed:.0f} s, over 3 heartbeat periods"
    reason = client.get_run(run_id).data.tags["vit_pipeline.end_reason"]
    assert reason.startswith("Marked KILLED by the end-crashed-runs flow") and flow_run_id in reason, reason
    print(f"SIGKILLed flow run: Crashed in Prefect and KILLED in MLflow {elapsed:.0f} s after the kill")
    started = time.monotonic()
    # The untyped overrides of earlier versions still work.
    out = _cli(["deployment", "run", "train-pipeline/quickstart-smoke", "--param", f"overrides={json.dumps(config)}",
                "--param", f"resume_run_id={run_id}", "--watch", "--watch-timeout", "600"], env, timeout=660)  # fmt: skip
    assert "Completed" in out
    print(f"resumed smoke deployment: trigger to completion {time.monotonic() - started:.1f} s")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["resumed_from_epoch"] >= 2
    # The resumed flow run found the dead owner first (KILLED), then owned the run itself.
    assert run.data.tags["vit_pipeline.previous_end"] == reason  # the zombie's end, kept on the resumed run
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, epochs + 1))
    assert run.data.params["epochs"] == str(epochs) and run.data.metrics["test_accuracy"] > 0.3  # chance: 0.1
    assert run.data.tags["prefect.flow_run_url"].startswith(api.removesuffix("/api"))
    (version,) = client.search_model_versions("name = 'vit-digits'")  # one version for the resumed run
    assert client.get_model_version_by_alias("vit-digits", "champion").run_id == run_id == version.run_id
    assert any(a.path == "benchmark/report.json" for a in client.list_artifacts(run_id, "benchmark"))
    # The Prefect summary links back to the MLflow UI on the tracking server.
    artifacts = httpx.post(
        f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["train-pipeline-summary"]}}}
    ).json()
    assert any(f"{env['MLFLOW_TRACKING_URI']}/#/experiments/" in a["data"] for a in artifacts)


def _typed_parameters_are_enforced_by_the_server(api: str, deployment: dict) -> None:
    """The Prefect UI's form comes from this schema; the server checks runs against it."""
    from vit_pipeline.config import PRESETS, field_names

    assert deployment["enforce_parameter_schema"] is True
    schema = deployment["parameter_openapi_schema"]
    assert schema["properties"]["preset"]["enum"] == list(PRESETS)
    fields = schema["definitions"]["ConfigOverrides"]
    assert fields["additionalProperties"] is False and set(fields["properties"]) == set(field_names())
    epochs = fields["properties"]["epochs"]
    assert {"type": "integer", "exclusiveMinimum": 0} in epochs["anyOf"]
    assert epochs["description"].startswith("Training epochs.") and "seed 100" in epochs["description"]
    assert {"enum": ["digits", "cifar100", "image_folder"], "type": "string"} in fields["properties"][
        "dataset"
    ]["anyOf"]
    for bad in ({"config": {"epoch": 5}}, {"config": {"epochs": 0}}, {"config": {"epochs": "five"}},
                {"config": {"dataset": "mnist"}}, {"preset": "nope"}):  # fmt: skip
        response = httpx.post(
            f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": bad}
        )
        assert response.status_code == 409 and "Validation failed" in response.text, (bad, response.text)
    created = httpx.post(
        f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}}
    )
    assert created.json() == []  # nothing was created (the scheduled deployments have their own runs)


def test_registrations_on_other_hosts_are_serialised_by_prefect(services, tmp_path):
    """Processes with separate pipeline homes (other hosts: no shared file lock) race for one name.

    Only the Prefect global concurrency limit is common to them; the champion
    must still be the best of all registrations.
    """
    import numpy as np
    from mlflow.tracking import MlflowClient

    from tests.code.test_registry import COUNTS, race
    from tests.conftest import labelled_split

    env, _, _, root = services
    split = labelled_split(COUNTS)
    split_path = tmp_path / "split.npz"
    np.savez(split_path, images=split.images, labels=split.labels)

    def host_env(i):
        return {**env, "VIT_PIPELINE_HOME": str(tmp_path / f"host{i}"), "PYTHONPATH": str(REPO)}

    results = race(env["MLFLOW_TRACKING_URI"], "race-hosts", [1, 3, 2], split_path, tmp_path, host_env)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("race-hosts", "champion")
    assert champion.tags["favoured"] == "3", results
    limits = httpx.post(f"{env['PREFECT_API_URL']}/v2/concurrency_limits/filter", json={}).json()
    assert any(lim["name"] == "vit-registry-race-hosts" and lim["limit"] == 1 for lim in limits)
