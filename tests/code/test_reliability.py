"""Crash and resume, and a tracking server that is down: real processes, real signals."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, PtyProcess, free_port

pytestmark = pytest.mark.integration  # real processes or servers: not in the fast tier

BIN = Path(sys.executable).parent


def _args(uri: str, epochs: int) -> list[str]:
    opts = []
    for key, value in {**TINY, "epochs": epochs, "batch_size": 64}.items():
        opts += [
            f"--{key.replace('_', '-')}",
            ",".join(map(str, value)) if isinstance(value, tuple) else str(value),
        ]
    return [str(BIN / "vit-pipeline"), "train", "--preset", "quickstart", *opts, "--tracking-uri", uri]


def _run_status(uri: str, home: Path) -> tuple[str | None, str | None]:
    """(run id, MLflow status) of the one run being trained under ``home``, if it exists yet."""
    found = list(home.glob("work/*/epochs.jsonl"))
    if not found:
        return None, None
    run_id = found[0].parent.name
    return run_id, MlflowClient(tracking_uri=uri).get_run(run_id).info.status


def test_sigkill_mid_training_then_resume(tmp_path):
    """RUNNING while alive, not FINISHED after SIGKILL, KILLED at the next command, FINISHED after --resume."""
    home = tmp_path / "home"
    env = {**os.environ, "VIT_PIPELINE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 8
    # On a terminal, as a user starts it: the progress bar is checked below.
    term = PtyProcess(_args(uri, epochs), {**env, "TERM": "xterm", "COLUMNS": "160"})
    proc = term.proc
    meta, alive_status = None, None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(home.glob("work/*/backup/training_metadata.json"))
        if found:
            try:
                meta = json.loads(found[0].read_text())
            except (json.JSONDecodeError, OSError):
                meta = None
            if meta and meta["epoch"] >= 1:
                alive_status = _run_status(uri, home)[1]  # read while the trainer lives
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    term.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    # A per-step bar with its ETA, redrawn in place, and a summary line per finished epoch.
    shown = term.output()
    assert f"Epoch 1/{epochs}" in shown and "ETA" in shown and "\r" in shown, shown[-2000:]
    from vit_pipeline import data
    from vit_pipeline.config import make_config

    steps = -(-len(data.prepare(make_config("quickstart")).y_train) // 64)
    assert f"/{steps} " in shown  # the step counter: the training digits in batches of 64
    assert f"Epoch 1/{epochs}: " in shown and "val_accuracy" in shown, shown[-2000:]
    assert alive_status == "RUNNING"
    run_id, after_kill = _run_status(uri, home)
    assert after_kill == "RUNNING"  # nobody could say otherwise yet; certainly not FINISHED
    killed_at = json.loads(found[0].read_text())["epoch"]
    assert 1 <= killed_at < epochs

    # The next command that opens the store finds the dead owner.
    listed = subprocess.run([str(BIN / "vit-pipeline"), "runs", "--tracking-uri", uri], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert f"Marked {run_id} KILLED" in listed.stderr
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["vit_pipeline.end_reason"]

    # --resume through the whole flow: trains the rest, registers one version, FINISHED.
    resume = [*_args(uri, epochs), "--resume", run_id, "--benchmark-batch-sizes", "1", "--benchmark-seconds", "0.05",
              "--benchmark-variants", "fp32", "--serve-candidates", "optimized"]  # fmt: skip
    resume[1] = "run"
    user_env = {k: v for k, v in env.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it
    resumed = subprocess.run(resume, env=user_env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # A healthy CPU-only run prints no ERROR lines (onnxruntime-gpu's CUDA probe included), and says
    # how to open the run URL of a local store.
    printed = resumed.stdout + resumed.stderr
    assert "[E:onnxruntime" not in printed and " ERROR " not in printed, printed[-3000:]
    assert f"mlflow ui --backend-store-uri {uri}" in printed
    result = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert result["mlflow_run_id"] == run_id and result["registry"]["version"] == "1"
    history = json.loads((home / "work" / run_id / "history.json").read_text())
    assert len(history["loss"]) == epochs
    for key in ("loss", "val_accuracy"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(1, epochs + 1)), (
            key,
            steps,
        )  # one value per epoch, counted from 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vit_pipeline.previous_end"].startswith(
        "Marked KILLED"
    )
    # resumed_from_epoch is where this process really started: the backup's epoch at the kill.
    assert run.data.metrics["resumed_from_epoch"] == killed_at
    assert not (home / "work" / run_id / "backup").exists()  # removed once model.keras and the result exist
    # The best epoch reported is the one whose weights are on disk.
    best = json.loads((home / "work" / run_id / "best.json").read_text())
    assert run.data.metrics["best_epoch"] == best["epoch"] + 1
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(best["value"])

    # (A second resume of the same run reuses that version: tests/code/test_registry.py::test_a_run_registers_once.)
    assert len(client.search_model_versions("name = 'vit-digits'")) == 1


def test_resume_refuses_a_different_config(tmp_path):
    env = {**os.environ, "VIT_PIPELINE_HOME": str(tmp_path / "home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from vit_pipeline import runs
    from vit_pipeline.config import make_config

    cfg = make_config("quickstart", {"tracking_uri": uri, "epochs": 3})
    run_id = runs.create_run(cfg, "quickstart", {runs.COMMAND_TAG: "train"})
    out = subprocess.run([str(BIN / "vit-pipeline"), "train", "--epochs", "4", "--tracking-uri", uri, "--resume",
                          run_id], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2
    assert f"Cannot resume run {run_id}: epochs differs. Received: epochs=4, run has 3" in out.stderr
    assert "Traceback" not in out.stderr


def test_tracking_server_down_at_start_fails_fast(tmp_path):
    env = {**os.environ, "VIT_PIPELINE_HOME": str(tmp_path / "home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = subprocess.run([str(BIN / "vit-pipeline"), "train", "--tracking-uri", uri, "--tracking-wait-seconds",
                          "1"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert lines and "is unreachable" in lines[0] and "nothing was trained" in lines[0]
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 60
    assert not list((tmp_path / "home").glob("work/*"))  # nothing half-written


def _mlflow_server(port: int, root: Path):
    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _kill(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_tracking_server_killed_mid_training(tmp_path):
    from tests.conftest import wait_for_http

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(port, tmp_path)
    env = {**os.environ, "VIT_PIPELINE_HOME": str(tmp_path / "home"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}  # fmt: skip
    epochs = 30  # tiny epochs take well under a second: leave time to pull the plug
    try:
        wait_for_http(f"{uri}/health", server, timeout=90)
        short = ["--max-train-images", "300"]  # short epochs: the point is the server's absence, not training
        proc = subprocess.Popen([*_args(uri, epochs), *short, "--tracking-wait-seconds", "2"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        client = MlflowClient(tracking_uri=uri)
        run_id, deadline = None, time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if run_id is None:
                exp = client.get_experiment_by_name("vit-digits")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                run_id = runs[0].info.run_id if runs else None
            if run_id and len(client.get_metric_history(run_id, "loss")) >= 2:
                _kill(server)  # the tracking server goes away after epoch 2
                break
            time.sleep(0.2)
        assert server.poll() is not None, "training ended before the server could be stopped"
        out, err = proc.communicate(timeout=300)
        # Training went on to the end, then said clearly what happened.
        assert proc.returncode == 1, err[-2000:]
        assert "Training finished" in err and f"--resume {run_id}" in err and "Traceback" not in err
        epoch_log = tmp_path / "home" / "work" / run_id / "epochs.jsonl"
        assert len(epoch_log.read_text().splitlines()) == epochs
        # Server back: resume uploads the missing epochs without training again.
        server = _mlflow_server(port, tmp_path)
        wait_for_http(f"{uri}/health", server, timeout=90)
        resumed = subprocess.run([*_args(uri, epochs), *short, "--resume", run_id], env=env, capture_output=True,
                                 text=True, timeout=300)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        result = json.loads(resumed.stdout[resumed.stdout.index("{") :])
        assert result["resumed_from_epoch"] == epochs and result["train_seconds"] == 0.0
        steps = [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, epochs + 1))
    finally:
        _kill(server)


def _start_flow(tmp_path: Path, home: Path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    """``vit-pipeline run`` (the whole flow, on a temporary Prefect server: no PREFECT_API_URL) in its own
    process group, as a shell gives a foreground job (the test is the terminal); output in run.log."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"VIT_PIPELINE_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _args(uri, 40)
    args[1] = "run"
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, uri


def test_sigterm_mid_flow_ends_the_run_killed_and_leaves_no_process_behind(tmp_path):
    """``kill <pid>`` of ``vit-pipeline run`` (as a process manager stops it): exit 143, the MLflow run KILLED
    at once, and the temporary Prefect server the flow started (no PREFECT_API_URL) is gone with it."""
    home = tmp_path / "home"
    proc, uri = _start_flow(tmp_path, home)
    try:
        run_id, deadline = None, time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            run_id, status = _run_status(uri, home)
            if status == "RUNNING" and (home / "work" / run_id / "epochs.jsonl").stat().st_size:
                proc.send_signal(signal.SIGTERM)  # to the command alone, not to its group
                break
            time.sleep(0.1)
        proc.wait(timeout=120)
        assert proc.returncode == 143, (tmp_path / "run.log").read_text()[-3000:]
        assert _run_status(uri, home)[1] == "KILLED"  # said by the run itself, nobody had to reap it
        # What a person needs after the kill was printed before training: the id --resume takes.
        assert f"MLflow run {run_id} (resume with --resume {run_id}," in (tmp_path / "run.log").read_text()
        # Nothing of it is left: the temporary server (a child in its process group) was stopped.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            left = subprocess.run(
                ["ps", "-o", "pid,cmd", "-g", str(proc.pid)], capture_output=True, text=True
            )
            pytest.fail(f"processes left in the command's group: {left.stdout}")
    finally:
        _kill(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _processes_with_env(marker: str) -> list[str]:
    """Command lines of live processes whose environment holds ``marker`` (e.g. a test's PREFECT_HOME)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def test_ctrl_c_mid_flow_ends_the_flow_run_and_the_mlflow_run_at_once(tmp_path):
    """Ctrl-C at a terminal sends SIGINT to the whole foreground process group of ``vit-pipeline run``. The
    temporary Prefect server must outlive the flow's end (it used to die first: the flow run stayed RUNNING in
    Prefect's database and the command took minutes to give up): the flow run ends CRASHED, the MLflow run
    KILLED, within seconds, and nothing of the command is left running."""
    import sqlite3

    home, prefect_home = tmp_path / "home", tmp_path / "prefect"
    proc, uri = _start_flow(tmp_path, home, PREFECT_HOME=str(prefect_home))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            run_id, status = _run_status(uri, home)
            if status == "RUNNING" and (home / "work" / run_id / "epochs.jsonl").stat().st_size:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group
                break
            time.sleep(0.1)
        interrupted = time.monotonic()
        proc.wait(timeout=90)  # it took minutes when the temporary server died first
        output = (tmp_path / "run.log").read_text()
        assert time.monotonic() - interrupted < 60, output[-3000:]
        assert proc.returncode == 130, output[-3000:]  # 128 + SIGINT, the shells' convention (Click said 1)
        assert _run_status(uri, home)[1] == "KILLED", output[-3000:]
        with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
            states = db.execute(
                "SELECT flow.name, flow_run.state_type FROM flow_run JOIN flow ON flow_run.flow_id = flow.id"
            ).fetchall()
        assert states and all(state != "RUNNING" for _, state in states), states
        assert ("train-pipeline", "CRASHED") in states, states
        deadline = time.monotonic() + 30  # the server stops at the command's exit
        while (left := _processes_with_env(f"PREFECT_HOME={prefect_home}")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left
    finally:
        _kill(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_prefect_artifact_the_api_cannot_take_is_a_warning_not_a_failed_run(caplog):
    """A Prefect server gone after the register stage failed the run whose version had just become champion."""
    import logging

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.conftest import free_port
    from vit_pipeline.flows import artifacts

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}), \
            caplog.at_level(logging.WARNING, logger="vit_pipeline.flows.artifacts"):  # fmt: skip
        artifacts.table("inference-benchmark", [{"a": 1}], "t")
        artifacts.markdown("train-pipeline-summary", "# x", "s")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("not attached" in line and "the MLflow run holds its figures" in line
                                   for line in lines), lines  # fmt: skip


def test_a_prefect_server_that_does_not_answer_is_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port

    env = {
        **os.environ,
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "VIT_PIPELINE_HOME": str(tmp_path),
    }
    cli = Path(sys.executable).parent / "vit-pipeline"
    out = subprocess.run(
        [str(cli), "run", "--epochs", "1"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("Error: Failed to reach API at http://127.0.0.1:") and len(lines) == 2, (
        out.stderr
    )
    assert "Is the Prefect server (PREFECT_API_URL) running?" in lines[0]
    # The command that talks to the API directly.
    out = subprocess.run([str(cli), "automations"], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 2, out.stderr
    assert lines[0].startswith("Error: Cannot reach the Prefect API at http://127.0.0.1:"), lines[0]


def test_scratch_folders_of_killed_processes_are_removed_by_the_next_one(tmp_path):
    """Downloads, exports and benchmark files live in one folder per process, removed at its exit; a SIGKILLed
    (OOM-killed) process cannot remove its own: the next process of the host does, never a live one's."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    hold = (
        "import sys, time\nfrom vit_pipeline.fsutil import scratch_dir\n"
        "d = scratch_dir('vit-init-')\n(d / 'model.keras').write_bytes(b'0' * 1000)\nprint(d, flush=True)\n"
        "time.sleep(120)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", hold], env=env, stdout=subprocess.PIPE, text=True)
    alive = subprocess.Popen([sys.executable, "-c", hold], env=env, stdout=subprocess.PIPE, text=True)
    try:
        gone, kept = Path(killed.stdout.readline().strip()), Path(alive.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert gone.is_dir() and kept.is_dir()
        # Its PID names a live process (reused), but nothing holds its lock: abandoned. Without a lock yet: new.
        reused = tmp_path / f"vit-pipeline-{os.getpid()}-reused"
        reused.mkdir()
        (reused / ".owner.lock").touch()
        (tmp_path / "vit-pipeline-1-being-made").mkdir()
        code = "from vit_pipeline.fsutil import scratch_root\nprint(scratch_root())"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert not gone.parent.exists() and kept.is_dir()  # the killed one's root went, the live one's stays
        assert not reused.exists() and (tmp_path / "vit-pipeline-1-being-made").is_dir()
        assert not Path(out.stdout.strip()).exists()  # its own, at its exit
    finally:
        for proc in (killed, alive):
            proc.kill()
            proc.wait(30)


@pytest.mark.parametrize("stop", ["KeyboardInterrupt()", "SystemExit(143)"])
def test_a_stop_exits_even_when_a_worker_thread_never_ends(tmp_path, stop):
    """After Ctrl-C (or SIGTERM) the command printed "Interrupted" and hung for good, the interpreter waiting for
    a thread pool's worker that a stop had left waiting for work: it now exits with its code after a watchdog."""
    script = (
        "import threading\nfrom vit_pipeline import cli\ncli.EXIT_WATCHDOG_SECONDS = 1.0\n"
        "threading.Thread(target=threading.Event().wait).start()  # non-daemon, never ends\n"
        f"@cli._friendly_errors\ndef command():\n    raise {stop}\ncommand()\n"
    )
    env = {**os.environ, "VIT_PIPELINE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == (130 if "Keyboard" in stop else 143), out.stderr[-2000:]
    assert "a thread was still running 1 s after the stop" in out.stderr
