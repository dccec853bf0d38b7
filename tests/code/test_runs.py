"""The MLflow run lifecycle (vit_pipeline.runs) on a real SQLite store."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ctrl_c_during
from vit_pipeline import runs, tracking
from vit_pipeline.config import make_config


@pytest.fixture
def cfg(tmp_path):
    return make_config("quickstart", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def _status(cfg, run_id):
    return tracking.client(cfg).get_run(run_id)


def test_running_inside_then_finished(cfg):
    with runs.tracked_run(cfg, "quickstart") as run_id:
        inside = _status(cfg, run_id)
        assert inside.info.status == "RUNNING" and inside.info.end_time is None
        assert inside.data.tags[runs.OWNER_PID] == str(os.getpid())
        assert inside.data.tags[runs.OWNER_HOST] == socket.gethostname()
    after = _status(cfg, run_id)
    assert after.info.status == "FINISHED" and after.info.end_time >= inside.info.start_time


def test_an_error_fails_the_run_and_an_interruption_kills_it(cfg):
    with pytest.raises(ValueError), runs.tracked_run(cfg) as failed:
        raise ValueError("Expected patch_size to divide image_size")
    run = _status(cfg, failed)
    assert run.info.status == "FAILED"
    assert run.data.tags[runs.ERROR] == "ValueError: Expected patch_size to divide image_size"
    with pytest.raises(KeyboardInterrupt), runs.tracked_run(cfg) as killed:
        raise KeyboardInterrupt
    run = _status(cfg, killed)
    assert run.data.tags[runs.END_REASON] == "KeyboardInterrupt: interrupted (Ctrl-C or SIGINT)"
    assert run.info.status == "KILLED"
    # A cancelled flow run: Prefect raises TerminationSignal, whose message is the signal's number at most.

    from prefect.exceptions import TerminationSignal

    with pytest.raises(TerminationSignal), runs.tracked_run(cfg) as cancelled:
        raise TerminationSignal(signal.SIGTERM)
    run = _status(cfg, cancelled)
    assert run.info.status == "KILLED" and run.data.tags[runs.END_REASON] == (
        "TerminationSignal: stopped by SIGTERM (a cancelled flow run, or its worker or service stopped)"
    )


def test_a_stop_while_a_failed_run_ends_waits_for_its_end_and_is_not_lost(cfg, monkeypatch):
    """A Ctrl-C while a run that failed is being ended waits (the run ends FAILED, not left RUNNING), and is
    delivered after: the command stops as asked (it was held and then dropped: exit 1, not 130)."""
    monkeypatch.setattr(runs, "_end", ctrl_c_during(runs._end))
    run_id = runs.create_run(cfg)
    with pytest.raises(KeyboardInterrupt), runs.lifecycle(cfg, run_id):
        raise RuntimeError("a stage failed")
    run = tracking.client(cfg).get_run(run_id)
    assert run.info.status == "FAILED" and "a stage failed" in run.data.tags[runs.ERROR]


def test_reap_marks_a_dead_owner_killed_and_leaves_the_living(cfg):
    client = tracking.client(cfg)
    alive = runs.create_run(cfg)  # owned by this (living) process; this process opened the store
    # A real process that owned a run and died without a word.
    code = (
        "import sys; from vit_pipeline import runs; from vit_pipeline.config import make_config; "
        f"print(runs.create_run(make_config('quickstart', {{'tracking_uri': {cfg.tracking_uri!r}}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    dead = out.stdout.strip().splitlines()[-1]
    assert client.get_run(dead).info.status == "RUNNING"
    assert runs.reap(client) == [dead]
    run = client.get_run(dead)
    assert run.info.status == "KILLED" and "is gone" in run.data.tags[runs.END_REASON]
    assert client.get_run(alive).info.status == "RUNNING"


def test_a_reused_pid_is_not_the_owner(cfg):
    client = tracking.client(cfg)
    run_id = runs.create_run(cfg)
    client.set_tag(run_id, runs.OWNER_STARTED, "12.34")  # our pid, but a process that started long ago
    assert runs.reap(client) == [run_id]
    assert "another" in client.get_run(run_id).data.tags[runs.END_REASON]


def test_other_hosts_are_judged_by_their_heartbeat(cfg, monkeypatch):
    client = tracking.client(cfg)
    monkeypatch.setenv(runs.STALE_ENV, "60")
    fresh, stale = runs.create_run(cfg), runs.create_run(cfg)
    for run_id, age in ((fresh, 5), (stale, 3600)):
        client.set_tag(run_id, runs.OWNER_HOST, "gpu-node-7")
        client.set_tag(run_id, runs.HEARTBEAT, f"{time.time() - age:.0f}")
    assert runs.reap(client) == [stale]
    assert "no heartbeat from pid" in client.get_run(stale).data.tags[runs.END_REASON]
    assert client.get_run(fresh).info.status == "RUNNING"


def test_heartbeat_is_refreshed_while_the_block_runs(cfg):
    with runs.tracked_run(cfg) as run_id, runs.lifecycle(cfg, run_id, heartbeat_seconds=0.2):
        first = float(_status(cfg, run_id).data.tags[runs.HEARTBEAT])
        time.sleep(1.5)
        assert float(_status(cfg, run_id).data.tags[runs.HEARTBEAT]) > first


def test_resume_reopens_a_killed_run_and_keeps_its_history(cfg):
    with pytest.raises(KeyboardInterrupt), runs.tracked_run(cfg) as run_id:
        raise KeyboardInterrupt
    with runs.tracked_run(cfg, resume_run_id=run_id):
        run = _status(cfg, run_id)
        assert run.info.status == "RUNNING" and runs.END_REASON not in run.data.tags
        assert run.data.tags[runs.PREVIOUS_END].startswith("KeyboardInterrupt")
    assert _status(cfg, run_id).info.status == "FINISHED"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=os.path.dirname(runs.__file__), capture_output=True, text=True)


def test_a_run_records_the_commit_of_the_code_that_ran_it(cfg, tmp_path, monkeypatch):
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    head = _git("rev-parse", "HEAD").stdout.strip()
    edited = _git("diff", "--quiet", "HEAD").returncode != 0
    run_id = runs.create_run(cfg)
    tags = _status(cfg, run_id).data.tags
    assert tags[MLFLOW_GIT_COMMIT] == head and len(head) == 40
    assert tags[runs.DIRTY] == str(edited).lower()
    # Resumed by other code: the run keeps the commit it began with and names the one that continued it.
    client = tracking.client(cfg)
    client.set_tag(run_id, MLFLOW_GIT_COMMIT, "0" * 40)
    runs.end_run(client, run_id, "KILLED", "test: a crash")
    with runs.tracked_run(cfg, resume_run_id=run_id):
        pass
    tags = _status(cfg, run_id).data.tags
    assert tags[MLFLOW_GIT_COMMIT] == "0" * 40 and tags[runs.RESUMED_COMMIT] == head
    # Installed outside a checkout (a wheel): no commit is claimed.
    monkeypatch.setattr(runs, "__file__", str(tmp_path / "site-packages" / "vit_pipeline" / "runs.py"))
    assert runs.source_tags() == {}


def test_resume_refuses_a_run_whose_owner_lives(cfg):
    from vit_pipeline.errors import TrainingInProgress

    run_id = runs.create_run(cfg)  # RUNNING, owned by this living process
    with pytest.raises(TrainingInProgress, match=f"pid {os.getpid()}"):
        runs.resume_run(cfg, run_id)


def test_resume_refuses_a_finished_run_and_leaves_it_as_it_was(cfg):
    from vit_pipeline.errors import ConfigError

    with runs.tracked_run(cfg, "quickstart") as run_id:
        pass
    before = _status(cfg, run_id)
    with (pytest.raises(ConfigError, match="it FINISHED; --resume continues a run that crashed"),
          runs.tracked_run(cfg, "quickstart", resume_run_id=run_id)):  # fmt: skip
        pass
    after = _status(cfg, run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags


def test_runs_command_lists_and_reaps(cfg):
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    client = tracking.client(cfg)
    run_id = runs.create_run(cfg)
    client.set_tag(run_id, runs.OWNER_STARTED, "12.34")
    runs._reaped.clear()  # a new command: it opens the store anew
    out = CliRunner().invoke(main, ["runs", "--tracking-uri", cfg.tracking_uri])
    assert out.exit_code == 0, out.output
    assert f"Marked {run_id} KILLED" in out.output and '"status": "KILLED"' in out.output


def test_runs_of_an_experiment_that_does_not_exist_is_an_error_not_an_empty_list(cfg):
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    runs.create_run(cfg)  # the store has an experiment ("vit-digits"), not the one asked for
    out = CliRunner().invoke(main, ["runs", "--tracking-uri", cfg.tracking_uri, "--experiment", "vit-digitz"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: No experiment named 'vit-digitz' in sqlite:///"), out.output
    out = CliRunner().invoke(main, ["runs", "--tracking-uri", cfg.tracking_uri, "--experiment", "vit-digits"])
    assert out.exit_code == 0 and '"status"' in out.output, out.output


def test_train_on_a_path_that_does_not_exist_opens_no_run(cfg, tmp_path):
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    missing = tmp_path / "no-such.tar.gz"
    out = CliRunner().invoke(main, ["train", "--preset", "cifar100", "--data-path", str(missing),
                                    "--tracking-uri", cfg.tracking_uri])  # fmt: skip
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: CIFAR-100 path does not exist: {missing}"), out.output
    client = tracking.client(cfg)
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_a_home_the_sqlite_uri_would_misread_is_refused_and_an_empty_one_is_the_default(
    tmp_path, monkeypatch
):
    from vit_pipeline.errors import ConfigError

    for name in ("runs?2", "100%"):
        monkeypatch.setenv("VIT_PIPELINE_HOME", str(tmp_path / name))
        with pytest.raises(ConfigError, match="without '\\?' or '%'"):
            tracking.tracking_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_PIPELINE_HOME", "")
    assert tracking.home() == tmp_path / "vit-runs"  # not the working directory itself


def test_system_metrics_are_logged_while_the_run_lives(tmp_path):
    cfg = make_config("quickstart", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                     "system_metrics_seconds": 0.3})  # fmt: skip
    with runs.tracked_run(cfg, "quickstart") as run_id:
        time.sleep(1.5)
    client = tracking.client(cfg)
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and steps == sorted(steps)
    off = make_config("quickstart", {"tracking_uri": cfg.tracking_uri, "system_metrics_seconds": 0})
    with runs.tracked_run(off, "quickstart") as quiet:
        time.sleep(0.5)
    assert not any(k.startswith("system/") for k in client.get_run(quiet).data.metrics)


def test_a_run_leaves_no_process_wide_mlflow_store(cfg):
    """Stages log through explicit clients; MLflow's fluent store is set for one block only."""
    import mlflow

    from vit_pipeline.mlflow_models import log_model

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with runs.tracked_run(cfg, "quickstart") as run_id:
        import mlflow.pyfunc

        class Echo(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input):
                return model_input

        info = log_model(cfg, run_id, mlflow.pyfunc, "echo", python_model=Echo(), pip_requirements=[])
    assert info.model_uri.startswith("models:/")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    # The model landed in the run's store, not in the default one.
    assert tracking.client(cfg).get_logged_model(info.model_id).source_run_id == run_id


def test_the_prefect_link_is_a_link_without_a_ui_url(monkeypatch):
    """Prefect's flow_run.ui_url is "None/flow-runs/..." when PREFECT_UI_URL is unset: never a tag value."""
    from vit_pipeline.summary import prefect_run_url

    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    url = prefect_run_url("abc", "None/flow-runs/flow-run/abc")
    assert url == "http://127.0.0.1:4200/runs/flow-run/abc"
    assert (
        prefect_run_url("abc", "http://prefect:4200/runs/flow-run/abc")
        == "http://prefect:4200/runs/flow-run/abc"
    )


def test_a_crashed_flow_run_ends_only_the_mlflow_runs_whose_owner_is_dead(cfg, monkeypatch):
    """Prefect's zombie verdict (missing flow-run heartbeats) ended a living run KILLED: liveness decides."""
    client = tracking.client(cfg)
    alive = runs.create_run(cfg, tags={"prefect.flow_run_id": "f-1"})  # owned by this living process
    code = (
        "from vit_pipeline import runs; from vit_pipeline.config import make_config; "
        f"print(runs.create_run(make_config('quickstart', {{'tracking_uri': {cfg.tracking_uri!r}}}), "
        "tags={'prefect.flow_run_id': 'f-1'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    dead = out.stdout.strip().splitlines()[-1]
    assert runs.mark_flow_run_killed(cfg, "f-1", "Marked KILLED: crashed") == [dead]
    assert client.get_run(alive).info.status == "RUNNING"
    ended = client.get_run(dead)
    assert ended.info.status == "KILLED" and ended.data.tags[runs.END_REASON].startswith(
        "Marked KILLED: crashed ("
    )
    # On another host (a container of its own) the MLflow heartbeat decides: a fresh one is watched until it
    # is FLOW_CRASH_STALE_SECONDS old (here 3 s): beating again is alive, silent is dead.
    monkeypatch.setattr(runs, "FLOW_CRASH_STALE_SECONDS", 3)
    client.set_tag(alive, runs.OWNER_HOST, "gpu-node-7")
    client.set_tag(alive, runs.HEARTBEAT, f"{time.time():.0f}")
    beat = threading.Timer(1.5, lambda: client.set_tag(alive, runs.HEARTBEAT, f"{time.time() + 1:.0f}"))
    beat.start()
    assert runs.mark_flow_run_killed(cfg, "f-1", "crashed") == []
    beat.join()
    started = time.monotonic()
    assert runs.mark_flow_run_killed(cfg, "f-1", "crashed") == [alive]  # no beat since: killed
    assert 1 < time.monotonic() - started < 10
    assert "no heartbeat from pid" in client.get_run(alive).data.tags[runs.END_REASON]


def test_a_crashed_flow_run_ends_the_child_runs_of_its_runs_too(cfg):
    """A sweep's trials (Dask workers) carry only mlflow.parentRunId: with the sweep's host lost they stayed
    RUNNING after its own run was ended. Children whose owner is dead end KILLED; a living one stays."""
    client = tracking.client(cfg)
    parent = runs.create_run(cfg, tags={"prefect.flow_run_id": "f-2"})
    runs.end_run(client, parent, "KILLED", "its flow run's hook ended it")  # as the sweep's own end did
    code = (
        "from vit_pipeline import runs; from vit_pipeline.config import make_config; "
        f"cfg = make_config('quickstart', {{'tracking_uri': {cfg.tracking_uri!r}}}); "
        f"print(*[runs.create_run(cfg, tags={{'mlflow.parentRunId': {parent!r}}}) for _ in range(2)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    dead = out.stdout.strip().splitlines()[-1].split()
    living = runs.create_run(cfg, tags={"mlflow.parentRunId": parent})
    assert sorted(runs.mark_flow_run_killed(cfg, "f-2", "crashed")) == sorted(dead)
    assert {client.get_run(r).info.status for r in dead} == {"KILLED"}
    assert client.get_run(living).info.status == "RUNNING"


def test_end_crashed_runs_takes_an_event_s_resource_or_an_id_and_says_what_else_is_wrong():
    from vit_pipeline import zombies

    uuid = "0b6b8a43-8a7e-4cf1-8ad2-6f3f3e0c2a11"
    assert zombies.flow_run_id(f"prefect.flow-run.{uuid}") == uuid == zombies.flow_run_id(uuid)
    for bad in ("", "flow-run-name", "prefect.flow-run."):  # a run of the deployment started by hand
        with pytest.raises(ValueError, match=r"^Expected flow_run_id to be a Prefect flow run id"):
            zombies.flow_run_id(bad)


def test_the_zombie_automations_judge_only_this_projects_flows(monkeypatch):
    from vit_pipeline import cli, zombies

    for automation, names in (
        (zombies.zombie_automation(), zombies.FLOW_NAMES),
        (zombies.crashed_automation("00000000-0000-0000-0000-000000000000"), zombies.CLEANED_UP_FLOWS),
    ):
        related = automation.trigger.match_related
        related = related[0] if isinstance(related, list) else related
        assert related.root == {"prefect.resource.role": "flow", "prefect.resource.name": names}
    # A crashed end-crashed-runs starts no other: it looped, one crashing after the other, for ever.
    assert "end-crashed-runs" not in zombies.CLEANED_UP_FLOWS
    import re
    from pathlib import Path

    declared = set()
    for path in (Path(runs.__file__).parent / "flows").glob("*.py"):
        declared |= set(re.findall(r'@flow\(\s*name="([^"]+)"', path.read_text()))
    assert declared == set(zombies.FLOW_NAMES), declared ^ set(zombies.FLOW_NAMES)
    # A CLI run sends heartbeats at the period the automation expects (Prefect's default is 180 s).
    monkeypatch.setattr(
        os, "environ", {k: v for k, v in os.environ.items() if k != "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}
    )
    cli._quiet_telemetry()  # on a copy of the environment: the test leaves this process's as it was
    assert os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(zombies.HEARTBEAT_SECONDS)


def test_processes_opening_a_fresh_store_together_all_succeed(tmp_path):
    """MLflow creates and migrates a SQLite schema on first open: commands started together on a fresh
    home (overlapping schedules) failed with alembic or sqlite errors, one of two in 10 of 10 tries."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    start = time.time() + 12  # every process imported and waiting, then released together
    code = (
        "import time, sys; from vit_pipeline import tracking; from vit_pipeline.config import make_config; "
        f"cfg = make_config('quickstart', {{'tracking_uri': {uri!r}}}); "
        f"time.sleep(max(0, {start} - time.time())); "
        "c = tracking.client(cfg); print(len(c.search_registered_models()), tracking.experiment_id(cfg, c))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=180) for p in procs]
    assert time.time() > start
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split()[0] == "0"


def test_resume_refuses_a_run_another_command_started(cfg):
    """`train --resume` of a pipeline run FINISHED it without its benchmark and card (and an evaluate run became a
    training run): a run is continued by what started it."""
    from vit_pipeline.errors import ConfigError

    for started, resuming in ((None, "train"), ("evaluate", "train"), ("evaluate", None)):
        tags = {runs.COMMAND_TAG: started} if started else {}
        with pytest.raises(KeyboardInterrupt), runs.tracked_run(cfg, "quickstart", tags) as run_id:
            raise KeyboardInterrupt
        again = {runs.COMMAND_TAG: resuming} if resuming else {}
        with (
            pytest.raises(ConfigError, match=f"Cannot resume run {run_id} with "),
            runs.tracked_run(cfg, "quickstart", again, resume_run_id=run_id),
        ):
            pass
        assert _status(cfg, run_id).info.status == "KILLED"
        with runs.tracked_run(cfg, "quickstart", tags, resume_run_id=run_id):  # as it was started: resumed
            pass
        assert _status(cfg, run_id).info.status == "FINISHED"
    # The pipeline finishes what `train` started (tests/code/test_reliability.py, after a SIGKILL).
    with (
        pytest.raises(KeyboardInterrupt),
        runs.tracked_run(cfg, "quickstart", {runs.COMMAND_TAG: "train"}) as run_id,
    ):
        raise KeyboardInterrupt
    with runs.tracked_run(cfg, "quickstart", resume_run_id=run_id):
        pass
    trial = {runs.COMMAND_TAG: "sweep-trial"}  # a sweep is started again, never continued
    with pytest.raises(KeyboardInterrupt), runs.tracked_run(cfg, "quickstart", trial) as run_id:
        raise KeyboardInterrupt
    with (
        pytest.raises(ConfigError, match="`sweep-trial` runs are not resumed"),
        runs.tracked_run(cfg, "quickstart", resume_run_id=run_id),
    ):
        pass


def test_a_sqlite_store_that_is_a_folder_or_another_file_is_one_line(tmp_path, pipeline_home):
    """MLflow retried a folder for about 100 s, then printed a 230-line sqlalchemy traceback."""
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.db").write_text("not a database")
    for path, says in (
        (tmp_path / "folder", "is a folder"),
        (tmp_path / "notes.db", "is not a SQLite database"),
    ):
        started = time.monotonic()
        result = CliRunner().invoke(main, ["runs", "--tracking-uri", f"sqlite:///{path}"])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output[
            -2000:
        ]  # a config error
        (error,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert f"The MLflow store sqlite:///{path} {says}" in error
        assert time.monotonic() - started < 20
    assert (tmp_path / "notes.db").read_text() == "not a database"
    from vit_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="notes.db/x.db cannot be created"):  # a command that writes
        tracking.client(
            make_config("quickstart", {"tracking_uri": f"sqlite:///{tmp_path / 'notes.db' / 'x.db'}"})
        )
    typo = tmp_path / "mlflwo.db"  # a listing only reads: a mistyped path made an empty store, "no runs"
    result = CliRunner().invoke(main, ["runs", "--tracking-uri", f"sqlite:///{typo}"])
    assert (
        result.exit_code == 1
        and f"No MLflow store at sqlite:///{typo}" in result.output
        and not typo.exists()
    )
