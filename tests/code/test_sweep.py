"""Sweeps: the search-space format, and a real sweep on a Dask cluster of separate processes."""

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import start_group, stop_group
from vit_pipeline.errors import ConfigError
from vit_pipeline.sweep import best_trial, load_space, parse_space, trial_configs, trial_overrides

REPO = Path(__file__).resolve().parents[2]

TINY_FIXED = {"epochs": 2, "projection_dim": 16, "transformer_units": [32, 16], "num_heads": 2,
              "transformer_layers": 1, "mlp_head_units": [32], "patch_size": 8,
              "serve_candidates": "optimized"}  # fmt: skip


def test_grid_expands_every_combination_in_a_stable_order():
    space = parse_space(
        {"preset": "quickstart", "parameters": {"learning_rate": [0.001, 0.002], "seed": [1, 2, 3]}}
    )
    trials = trial_overrides(space)
    assert len(trials) == 6 and trials[0] == {"learning_rate": 0.001, "seed": 1}
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 6


def test_random_search_draws_reproducibly_within_ranges():
    raw = {"preset": "quickstart", "method": "random", "num_trials": 5, "seed": 7,
           "parameters": {"weight_decay": {"min": 0.01, "max": 0.1, "log": True},
                          "transformer_layers": {"min": 1, "max": 4, "int": True}, "pooling": ["gap", "flatten"]}}  # fmt: skip
    a, b = trial_overrides(parse_space(raw)), trial_overrides(parse_space(raw))
    assert a == b and len(a) == 5
    assert all(0.01 <= t["weight_decay"] <= 0.1 and t["transformer_layers"] in (1, 2, 3, 4) for t in a)
    assert trial_overrides(parse_space({**raw, "seed": 8})) != a


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"parameters": {"learning_rat": [1]}}, "Unknown config field 'learning_rat'"),
        ({"parameters": {"tracking_uri": ["foo://bar"]}}, "tracking_uri is the sweep's own .--tracking-uri."),
        (
            {"fixed": {"tracking_uri": "sqlite:///x.db"}, "parameters": {"seed": [1]}},
            "the sweep run and its trials",
        ),
        ({"parameters": {}}, "non-empty 'parameters'"),
        ({"parameters": {"weight_decay": {"min": 0.1, "max": 0.2}}}, "grid search needs a list"),
        ({"method": "random", "parameters": {"seed": [1]}}, "num_trials from 1 to 10000"),
        ({"method": "random", "num_trials": True, "parameters": {"seed": [1]}}, "num_trials=True"),
        (
            {"method": "random", "num_trials": 10**9, "parameters": {"seed": [1]}},
            "num_trials from 1 to 10000",
        ),
        ({"parameters": {"seed": list(range(200)), "epochs": list(range(1, 101))}}, "20000 combinations"),
        ({"seed": "abc", "parameters": {"seed": [1]}}, "seed=.abc."),
        ({"preset": ["quickstart"], "parameters": {"seed": [1]}}, "Unknown preset"),
        (
            {"method": "random", "num_trials": 2, "parameters": {"learning_rate": {"min": "a", "max": "b"}}},
            "finite numbers",
        ),
        (
            {
                "method": "random",
                "num_trials": 2,
                "parameters": {"epochs": {"min": 1, "max": 3, "int": "yes"}},
            },
            "true or false",
        ),
        ({"preset": "nope", "parameters": {"seed": [1]}}, "Unknown preset"),
        ({"parameters": {"seed": [1]}, "trials": 3}, "Unknown keys"),
    ],
)
def test_bad_spaces_name_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(raw)


def test_every_trial_is_validated_before_any_work():
    space = parse_space({"preset": "quickstart", "parameters": {"patch_size": [4, 7]}})
    with pytest.raises(ConfigError, match=r"Trial 1 \(\{'patch_size': 7\}\).*patch_size to divide"):
        trial_configs(space)


def test_space_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: [unclosed\n")
    with pytest.raises(ConfigError, match="Could not parse"):
        load_space(bad)
    (tmp_path / "evil.yaml").write_text("!!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_space(tmp_path / "evil.yaml")
    assert not (tmp_path / "pwned").exists()
    laughs = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    (tmp_path / "laughs.yaml").write_text("\n".join(laughs) + "\nparameters: {seed: *i}\n")  # 9**9 values
    with pytest.raises(ConfigError, match="aliases .* are not accepted"):
        load_space(tmp_path / "laughs.yaml")
    (tmp_path / "deep.yaml").write_text("parameters: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="Could not parse"):
        load_space(tmp_path / "deep.yaml")
    (tmp_path / "latin1.yaml").write_bytes("parameters: {seed: [1]}  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="Could not parse"):
        load_space(tmp_path / "latin1.yaml")


def test_shipped_search_spaces_are_valid():
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        assert trial_configs(load_space(path)), path


def test_best_trial_ignores_failed_trials():
    rows = [{"status": "failed", "index": 0}, {"status": "ok", "index": 1, "best_val_accuracy": 0.2},
            {"status": "ok", "index": 2, "best_val_accuracy": 0.5}]  # fmt: skip
    assert best_trial(rows, "best_val_accuracy")["index"] == 2
    assert best_trial(rows[:1], "best_val_accuracy") is None


def _start(cmd, env, log):
    return start_group(cmd, env, log, REPO)


_stop = stop_group


def _scheduler(tmp_path, pipeline_home):
    """A Dask scheduler process on a free port: (its address, the workers' environment, the log, the process)."""
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIT_PIPELINE_HOME": str(pipeline_home),
           "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    log = open(tmp_path / "dask.log", "w")  # noqa: SIM115
    proc = _start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                   "--port", str(port), "--no-dashboard"], env, log)  # fmt: skip
    return f"tcp://127.0.0.1:{port}", env, log, proc


def _worker_cmd(address: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard",
            "--memory-limit", "0", *options]  # fmt: skip


@pytest.fixture
def dask_cluster(tmp_path, pipeline_home):
    """A Dask scheduler and N single-threaded worker processes (N=2, or $SWEEP_TEST_WORKERS)."""
    from distributed import Client

    workers = int(os.environ.get("SWEEP_TEST_WORKERS", "2"))
    address, env, log, scheduler = _scheduler(tmp_path, pipeline_home)
    procs = [scheduler, _start(_worker_cmd(address, "--nworkers", str(workers)), env, log)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=90)
        yield address, workers
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()


@pytest.mark.integration
def test_sweep_runs_trials_in_parallel_on_dask_and_registers_the_winner(dask_cluster, tmp_path):
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from vit_pipeline.flows.sweep import sweep

    address, workers = dask_cluster
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = {"preset": "quickstart", "fixed": TINY_FIXED,
             # 5 images cannot be split: a trial that fails at run time, not at validation.
             "parameters": {"max_train_images": [600, 5, 300]}}  # fmt: skip
    with prefect_test_harness(server_startup_timeout=120):
        result = sweep(space=space, dask_address=address, overrides={"tracking_uri": uri})
    print(f"sweep wall time with {workers} worker(s): trials {result['trials_seconds']:.1f} s, "
          f"whole flow {result['seconds']:.1f} s")  # fmt: skip

    trials = {t["index"]: t for t in result["trials"]}
    assert [trials[i]["status"] for i in range(3)] == ["ok", "failed", "ok"]
    assert "Cannot hold out" in trials[1]["error"]
    ok = [trials[0], trials[2]]
    assert all(set(t) >= {"best_val_accuracy", "model_path", "data_path", "run_id"} for t in ok)
    assert all(Path(t["model_path"]).exists() for t in ok)  # paths, not models
    if workers > 1:  # two trials ran at the same time in two worker processes
        assert max(t["start"] for t in ok) < min(t["end"] for t in ok)
        assert ok[0]["pid"] != ok[1]["pid"]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_finished"] == 2
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    status = {int(r.data.tags["sweep.trial"]): r.info.status for r in children}
    assert status == {0: "FINISHED", 1: "FAILED", 2: "FINISHED"}
    failed = next(r for r in children if r.info.status == "FAILED")
    assert (
        "Cannot hold out" in failed.data.tags["vit_pipeline.error"]
        and trials[1]["run_id"] == failed.info.run_id
    )
    # One value per epoch in each trial's run.
    for t in ok:
        assert [m.step for m in client.get_metric_history(t["run_id"], "loss")] == [1, 2]

    best = max(ok, key=lambda t: t["best_val_accuracy"])
    assert result["best"]["run_id"] == best["run_id"] == parent.data.tags["sweep.best_run_id"]
    champion = client.get_model_version_by_alias("vit-digits", "champion")
    assert champion.run_id == best["run_id"] and result["registry"]["promoted"]
    winner = client.get_run(best["run_id"])
    assert winner.data.tags["export.parity"] == "passed" and "test_accuracy" in winner.data.metrics
    # The same stages after training as a plain run: the card's speed rows were "not measured" for a sweep.
    assert "benchmark/report.json" in {a.path for a in client.list_artifacts(best["run_id"], "benchmark")}


def test_a_cluster_sweep_refuses_a_temporary_prefect_server(tmp_path):
    """Without PREFECT_API_URL a worker would report to a server of its own: refused before any trial."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    space = tmp_path / "space.yaml"
    space.write_text("preset: quickstart\nparameters:\n  seed: [1, 2]\n")
    done = subprocess.run([sys.executable, "-m", "vit_pipeline.cli", "sweep", str(space), "--dask-address",
                           "tcp://127.0.0.1:9"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "set PREFECT_API_URL to a real Prefect server" in done.stderr
    first, *rest = done.stderr.strip().splitlines()
    assert first.startswith("Error: A sweep on the Dask cluster at tcp://127.0.0.1:9 needs one Prefect API")
    assert all(line.startswith("(details: ") for line in rest), done.stderr  # the CLI's one line, and its log
    assert not (Path(os.environ["VIT_PIPELINE_HOME"]) / "mlflow.db").exists()  # no run was created


@pytest.mark.integration
def test_a_lost_host_ends_the_sweep_with_the_store_true(tmp_path, pipeline_home, mlflow_server):
    """Two 'hosts' (worker sessions); one is SIGKILLed mid-trial: Dask re-runs its trial elsewhere, and as the
    sweep returns, the lost attempt is KILLED with its reason and no run under the sweep is left RUNNING.
    A real Prefect server (the harness's) and a real ``mlflow server``, as a cluster's hosts would use."""
    import signal
    import threading
    import time

    from distributed import Client
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from vit_pipeline.flows.sweep import sweep

    address, env, log, scheduler = _scheduler(tmp_path, pipeline_home)
    procs = [scheduler]
    hosts = [_start(_worker_cmd(address), env, log) for _ in range(2)]  # two sessions: two "hosts"
    uri = mlflow_server  # shared with other tests: this sweep's own experiment and model names below
    killed: dict = {}
    worker_servers: set[int] = set()  # Prefect servers started in a worker's session (there must be none)

    def kill_a_host_mid_trial() -> None:
        """Waits until both hosts train a trial, then SIGKILLs the whole session of one of them."""
        import psutil

        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            time.sleep(0.5)
            for proc in psutil.process_iter(["pid", "cmdline"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if "prefect.server.api.server:create_app" in " ".join(proc.info["cmdline"] or ()) and (
                        os.getsid(proc.info["pid"]) in {h.pid for h in hosts}
                    ):
                        worker_servers.add(proc.info["pid"])
            try:
                running = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                             filter_string="attributes.status = 'RUNNING' and tags.`sweep.trial` != ''")  # fmt: skip
            except Exception:  # the store is not created yet
                continue
            owners = {
                int(r.data.tags["vit_pipeline.owner.pid"]): r for r in running if "sweep.trial" in r.data.tags
            }
            sessions = {os.getsid(pid): r for pid, r in owners.items() if _alive(pid)}
            if len(sessions) >= 2 and hosts[0].pid in sessions:
                run = sessions[hosts[0].pid]
                killed.update(run_id=run.info.run_id, trial=run.data.tags["sweep.trial"])
                os.killpg(hosts[0].pid, signal.SIGKILL)  # the host dies: nanny, worker and trial together

    try:
        with Client(address, timeout=60) as dask_client:
            dask_client.wait_for_workers(2, timeout=90)
        killer = threading.Thread(target=kill_a_host_mid_trial, daemon=True)
        killer.start()
        space = {"preset": "quickstart", "parameters": {"seed": [1, 2, 3, 4]},
                 "fixed": {**TINY_FIXED, "epochs": 3, "experiment_name": "lost-host",
                           "registered_model_name": "vit-lost-host"}}  # fmt: skip
        with prefect_test_harness(server_startup_timeout=120):
            result = sweep(space=space, dask_address=address, overrides={"tracking_uri": uri})
            trial_states = asyncio.run(_trial_task_states())
        killer.join(timeout=5)
    finally:
        for proc in reversed([*procs, *hosts]):
            _stop(proc)
        log.close()
    assert killed, "no moment with a trial on each host: nothing was killed"
    # One Prefect API for the cluster: the trials' task runs are on the flow's server, and no worker started its own.
    assert trial_states == {f"trial-{i}": "COMPLETED" for i in range(4)} and not worker_servers
    client = MlflowClient(uri)
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    assert [t["status"] for t in result["trials"]] == ["ok"] * 4 and result["registry"]["model_uri"]
    assert not [r.info.run_id for r in children if r.info.status == "RUNNING"]  # as the sweep returns
    lost = client.get_run(killed["run_id"])
    rerun = next(t["run_id"] for t in result["trials"] if str(t["index"]) == killed["trial"])
    assert lost.info.status == "KILLED" and rerun != killed["run_id"]
    assert f"trial {killed['trial']} was re-run as run {rerun}" in lost.data.tags["vit_pipeline.end_reason"]
    assert parent.data.metrics["trials_lost_attempts"] == 1 and parent.data.metrics["trials_finished"] == 4
    assert result["lost_attempts"] == [{"trial": int(killed["trial"]), "run_id": killed["run_id"],
                                        "rerun_as": rerun, "reason": f"worker lost: trial {killed['trial']} was "
                                                                     f"re-run as run {rerun}"}]  # fmt: skip
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.json")).read_text())
    assert "lost" in json.dumps(table)


async def _trial_task_states() -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    async with get_client() as client:
        found = await client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="trial-"))
        )
    return {t.name: t.state_type.value for t in found}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
