"""Champion/challenger against a real MLflow store: like-with-like, faults, races.

The models are real ONNX files with the pipeline's contract whose accuracy on a
split is known in advance (``constant_classifier``: always one class), so every
expected decision follows from the labels.
"""

import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FaultyProxy, constant_classifier, ctrl_c_during, free_port, labelled_split
from vit_pipeline import runs, tracking
from vit_pipeline.config import make_config
from vit_pipeline.registry import CHAMPION, RegistryError, register_onnx

pytestmark = pytest.mark.integration  # real processes or servers: not in the fast tier

# Class c is counts[c] of the 100 test images: always predicting c scores counts[c] %.
COUNTS = [10, 20, 30, 40]


def _register(cfg, tmp_path, favoured, split, run_id=None):
    path = constant_classifier(
        tmp_path / f"const{favoured}-{time.monotonic_ns()}.onnx", len(split.class_names), favoured
    )
    run_id = run_id or runs.create_run(cfg, "test")
    return register_onnx(cfg, run_id, str(path), split, keras_test_accuracy=0.5), run_id


@pytest.fixture
def cfg(tmp_path):
    return make_config("cifar100", {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})


def _champion(cfg, name="vit-cifar100"):
    return str(tracking.client(cfg).get_model_version_by_alias(name, CHAMPION).version)


def test_served_file_decides_on_the_same_split(cfg, tmp_path):
    split = labelled_split(COUNTS)
    first, _ = _register(cfg, tmp_path, 0, split)
    assert first.promoted and first.reason == "no champion yet" and first.served_test_accuracy == 0.10
    better, _ = _register(cfg, tmp_path, 2, split)
    assert better.promoted and better.version == "2" and better.champion_test_accuracy == pytest.approx(0.10)
    assert "0.3000 >= champion v1's 0.1000 on the same 100 test images" in better.reason
    worse, run_id = _register(cfg, tmp_path, 1, split)
    assert not worse.promoted and "0.2000 < champion v2's 0.3000" in worse.reason
    equal, _ = _register(cfg, tmp_path, 2, split)
    assert equal.promoted  # at least the champion's accuracy
    # A version that lost the alias says to which (its "promoted" decision alone read as if it still served).
    client = tracking.client(cfg)
    assert [client.get_model_version("vit-cifar100", v).tags.get("replaced_by") for v in "1234"] == [
        "2", "4", None, None
    ]  # fmt: skip
    assert _champion(cfg) == "4"
    client = tracking.client(cfg)
    v3 = client.get_model_version("vit-cifar100", "3")
    assert (
        v3.tags["served_test_accuracy"] == "0.200000"
        and v3.tags["champion_test_accuracy_same_split"] == "0.300000"
    )
    assert v3.tags["keras_test_accuracy"] == "0.500000" and v3.tags["test_split_digest"] == split.digest
    assert v3.tags["promotion"].startswith("not promoted")
    # The figures that decided are on the version's logged model too (its page in the experiment's Models tab).
    logged = client.get_logged_model(v3.source.removeprefix("models:/"))
    assert {k: m.value for k, m in ((m.key, m) for m in logged.metrics) if k.startswith("served_")} == {
        "served_test_accuracy": 0.2,
        "served_test_top5_accuracy": 1.0,
    }
    run = client.get_run(run_id)
    assert (
        run.data.tags["registry.decision"] == "not promoted"
        and run.data.metrics["served_test_accuracy"] == 0.2
    )


def test_a_promotion_whose_run_stops_before_its_last_stage_is_withdrawn_and_decided_again_on_resume(
    cfg, tmp_path
):
    """A run stopped (Ctrl-C, SIGTERM, a failure) after its registration left its model champion with the run
    KILLED: the alias goes back, the decision is removed, a resume decides again; a later champion stays."""
    from vit_pipeline.registry import REPLACED, withdraw_stopped

    split = labelled_split(COUNTS)
    first, first_run = _register(cfg, tmp_path, 0, split)
    better, better_run = _register(cfg, tmp_path, 2, split)
    client = tracking.client(cfg)
    assert _champion(cfg) == "2" and client.get_model_version("vit-cifar100", "2").tags[REPLACED] == "1"
    assert client.get_model_version("vit-cifar100", "1").tags["replaced_by"] == "2"
    withdraw_stopped(client, "vit-cifar100", better_run, "KeyboardInterrupt")
    assert (
        _champion(cfg) == "1"
    )  # champion again: no longer replaced; the withdrawn one says it was withdrawn
    assert "replaced_by" not in client.get_model_version("vit-cifar100", "1").tags
    assert "replaced_by" not in client.get_model_version("vit-cifar100", "2").tags
    v2 = client.get_model_version("vit-cifar100", "2")
    assert "promotion" not in v2.tags
    assert v2.tags["withdrawn"] == "its run stopped before its last stage (KeyboardInterrupt)"
    assert client.get_run(better_run).data.tags["registry.decision"] == "withdrawn"
    again, _ = _register(cfg, tmp_path, 2, split, run_id=better_run)  # --resume: decided again
    assert again.promoted and again.version == "2" and _champion(cfg) == "2"
    assert "withdrawn" not in client.get_model_version("vit-cifar100", "2").tags
    withdraw_stopped(client, "vit-cifar100", first_run, "late")  # v1's promotion was long replaced: v2 stays
    assert _champion(cfg) == "2"
    lone = make_config(
        "cifar100", {"tracking_uri": cfg.tracking.tracking_uri, "registered_model_name": "lone"}
    )
    only, only_run = _register(lone, tmp_path, 0, split)
    withdraw_stopped(client, "lone", only_run, "stopped")  # no champion before it: none after
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias("lone", CHAMPION)


def test_a_stop_while_the_decision_is_recorded_withdraws_it_and_a_resume_can_withdraw_too(
    cfg, tmp_path, monkeypatch, caplog
):
    """A Ctrl-C among the writes after the alias moved returned no Registration: nothing withdrew the promotion.
    The run's end withdraws it from what the version records; a resumed run that stops withdraws it too."""
    from vit_pipeline import registry

    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)
    real = registry._record_decision

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "_record_decision", interrupted)
    run_id = runs.create_run(cfg, "test")
    with pytest.raises(KeyboardInterrupt), runs.lifecycle(cfg, run_id):
        _register(cfg, tmp_path, 2, split, run_id=run_id)
    client = tracking.client(cfg)
    assert (
        _champion(cfg) == "1"
        and "KeyboardInterrupt" in client.get_model_version("vit-cifar100", "2").tags["withdrawn"]
    )
    assert client.get_run(run_id).info.status == "KILLED"
    monkeypatch.setattr(registry, "_record_decision", real)
    with (
        pytest.raises(KeyboardInterrupt),
        runs.lifecycle(cfg, run_id),
    ):  # --resume: promoted, then stopped again
        again, _ = _register(cfg, tmp_path, 2, split, run_id=run_id)
        assert again.promoted and _champion(cfg) == "2"
        raise KeyboardInterrupt
    assert _champion(cfg) == "1" and client.get_run(run_id).data.tags["registry.decision"] == "withdrawn"
    # Withdrawing while the store fails is logged, never raised in place of the stop's own cause.
    with runs.lifecycle(cfg, run_id):
        _register(cfg, tmp_path, 2, split, run_id=run_id)
    assert _champion(cfg) == "2"
    monkeypatch.setattr(
        registry, "_withdraw", lambda *a, **k: (_ for _ in ()).throw(RegistryError("store down"))
    )
    with caplog.at_level(logging.WARNING, logger="vit_pipeline.registry"):
        registry.withdraw_stopped(client, "vit-cifar100", run_id, "KeyboardInterrupt")
    assert any(
        "store down" in r.getMessage() and "may stay champion" in r.getMessage() for r in caplog.records
    )


def test_a_stop_after_the_last_stage_withdraws_and_a_second_ctrl_c_waits_for_it(cfg, tmp_path, monkeypatch):
    """The run's end is the one place a stop is turned into a withdrawal: a stop after the model card (or in
    the register task's own completion) left a KILLED run's model champion. A second Ctrl-C while the
    withdrawal runs (a real SIGINT) waits for it: it broke off half-way, the version "withdrawn" yet champion."""

    from vit_pipeline import registry

    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)
    monkeypatch.setattr(registry, "_withdraw", ctrl_c_during(registry._withdraw))
    run_id = runs.create_run(cfg, "test")
    with pytest.raises(KeyboardInterrupt), runs.lifecycle(cfg, run_id):
        _register(cfg, tmp_path, 2, split, run_id=run_id)
        assert _champion(cfg) == "2"
        raise KeyboardInterrupt  # after every stage: the result, the summary artifact
    client = tracking.client(cfg)
    v2 = client.get_model_version("vit-cifar100", "2")
    assert (
        _champion(cfg) == "1" and "promotion" not in v2.tags and "KeyboardInterrupt" in v2.tags["withdrawn"]
    )
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_run_sigkilled_after_its_promotion_is_withdrawn_by_whatever_ends_it(cfg, tmp_path, monkeypatch):
    """A SIGKILL after the alias moved (in the model card, say) runs no ``lifecycle`` end: the reaper marked the
    run KILLED and its model stayed champion. Ending a dead owner's run withdraws its promotion too; a withdrawal
    that fails leaves the run RUNNING for the next pass (KILLED, nothing would try again)."""
    from vit_pipeline import registry

    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)
    # A real process: it creates a run, registers a better model (promoted), and is SIGKILLed.
    code = f"""
import os, signal, sys
from pathlib import Path
from tests.conftest import constant_classifier, labelled_split
from vit_pipeline import runs
from vit_pipeline.config import make_config
from vit_pipeline.registry import register_onnx
cfg = make_config("cifar100", {{"tracking_uri": {cfg.tracking_uri!r}}})
run_id = runs.create_run(cfg, "test")
print(run_id, flush=True)
path = constant_classifier(Path({str(tmp_path / "killed.onnx")!r}), {len(COUNTS)}, 2)
assert register_onnx(cfg, run_id, str(path), labelled_split({COUNTS!r}), keras_test_accuracy=0.5).promoted
os.kill(os.getpid(), signal.SIGKILL)
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == -9, out.stderr[-2000:]
    run_id = out.stdout.split()[0]
    client = tracking.client(cfg)
    assert _champion(cfg) == "2" and client.get_run(run_id).info.status == "RUNNING"
    with monkeypatch.context() as patched:
        patched.setattr(
            registry, "_withdraw", lambda *a, **k: (_ for _ in ()).throw(RegistryError("lock busy"))
        )
        assert runs.reap(client) == []
    assert _champion(cfg) == "2" and client.get_run(run_id).info.status == "RUNNING"
    assert runs.reap(client) == [run_id]
    v2 = client.get_model_version("vit-cifar100", "2")
    assert _champion(cfg) == "1" and "promotion" not in v2.tags
    assert v2.tags["withdrawn"].startswith("its run stopped before its last stage (Marked KILLED by pid")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["registry.decision"] == "withdrawn"


def test_a_withdrawal_that_cannot_take_the_lock_leaves_the_version_champion_and_recorded_promoted(
    cfg, tmp_path, monkeypatch, caplog
):
    """Another registration holding the lock past the wait: the tags were written first, so the version said
    "withdrawn" while the alias still named it. Now nothing is written, and the log says it stays champion."""
    import fcntl

    from vit_pipeline import registry

    monkeypatch.setattr(registry, "WITHDRAW_LOCK_SECONDS", 0.5)
    monkeypatch.setenv("VIT_PIPELINE_HOME", str(tmp_path / "home"))
    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)
    run_id = runs.create_run(cfg, "test")
    with contextlib.ExitStack() as stack, pytest.raises(KeyboardInterrupt), runs.lifecycle(cfg, run_id):
        _register(cfg, tmp_path, 2, split, run_id=run_id)
        (lock,) = (tmp_path / "home" / "locks").glob("registry-vit-cifar100-*.lock")
        held = stack.enter_context(open(lock, "a"))
        fcntl.flock(held, fcntl.LOCK_EX)  # another registration's, as a separate open file holds it
        caplog.set_level(logging.WARNING, logger="vit_pipeline.registry")
        raise KeyboardInterrupt
    client = tracking.client(cfg)
    v2 = client.get_model_version("vit-cifar100", "2")
    assert (
        _champion(cfg) == "2" and v2.tags["promotion"].startswith("promoted") and "withdrawn" not in v2.tags
    )
    assert client.get_run(run_id).data.tags["registry.decision"] == "promoted"
    assert any("may stay champion" in r.getMessage() for r in caplog.records)


def _lock_held(name: str) -> bool:
    """Whether some open file holds the registry lock of ``name`` (a new descriptor's non-blocking try)."""
    import fcntl

    from vit_pipeline.registry import lock_path

    path = lock_path(name)
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_the_champion_is_measured_before_the_lock_and_again_if_it_moved_meanwhile(cfg, tmp_path, monkeypatch):
    """The champion's download and inference (minutes for a large model, and both robustness passes) ran
    holding the registry lock: other registrations waited, and a stopped run's withdrawal gave up after 30 s."""
    from vit_pipeline import registry

    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)  # v1: 0.10
    measured = []
    real_logits, real_against = registry.champion_logits, registry.measure_against

    def spy(champion, *args, **kwargs):  # the real function, and whether the lock was held when it ran
        measured.append((str(champion.version), _lock_held("vit-cifar100")))
        return real_logits(champion, *args, **kwargs)

    monkeypatch.setattr(registry, "champion_logits", spy)
    second, _ = _register(cfg, tmp_path, 1, split)  # v2: 0.20
    assert second.promoted and measured == [("1", False)]
    # Another registration moves the alias back to v1 after v3's comparison with v2 and before v3 takes the
    # lock: v3 is compared again, under the lock, with the champion it replaces.
    client = tracking.client(cfg)

    def then_moved(*args, **kwargs):
        against = real_against(*args, **kwargs)
        client.set_registered_model_alias("vit-cifar100", CHAMPION, "1")
        return against

    monkeypatch.setattr(registry, "measure_against", then_moved)
    measured.clear()
    third, _ = _register(cfg, tmp_path, 1, split)  # v3: 0.20
    assert measured == [("2", False), ("1", True)], measured
    assert third.promoted and "0.2000 >= champion v1's 0.1000" in third.reason, third.reason
    assert client.get_model_version("vit-cifar100", "3").tags["replaced"] == "1"


def test_champion_is_judged_on_the_new_split_not_its_stored_figure(cfg, tmp_path):
    # On split A the champion (always class 3) scores 0.9; on split B only 0.1.
    _register(cfg, tmp_path, 3, labelled_split([5, 5, 0, 90], seed=1))
    split_b = labelled_split([40, 50, 0, 10], seed=2)
    challenger, _ = _register(cfg, tmp_path, 1, split_b)
    assert challenger.promoted and challenger.champion_test_accuracy == pytest.approx(0.10)
    assert _champion(cfg) == "2"


def test_a_champion_that_cannot_be_evaluated_is_not_replaced(cfg, tmp_path):
    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)
    # The champion's files vanish from the artifact store (a real fault, not a mock).
    for onnx_file in (tracking.home() / "artifacts").rglob("model.onnx"):
        onnx_file.unlink()
    blocked, _ = _register(cfg, tmp_path, 3, split)
    assert not blocked.promoted and "champion v1 could not be evaluated" in blocked.reason
    assert _champion(cfg) == "1"


def test_a_champion_the_store_cannot_deliver_now_is_no_decision(cfg, tmp_path, monkeypatch):
    """A store outage while the champion downloads recorded 'not replaced' for good (a resume kept it)."""
    from tests.conftest import free_port
    from vit_pipeline.registry import RegistryError

    split = labelled_split(COUNTS)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = tracking.client(cfg)
    run = client.create_run(tracking.experiment_id(cfg, client))
    # The champion's files are behind an artifact server that does not answer (a real refused connection).
    client.create_registered_model("vit-cifar100")
    gone = client.create_model_version("vit-cifar100", f"http://127.0.0.1:{free_port()}/api/2.0/mlflow-artifacts/artifacts/m",
                                       run.info.run_id)  # fmt: skip
    client.set_model_version_tag("vit-cifar100", gone.version, "dataset", cfg.dataset_tag)
    client.set_registered_model_alias("vit-cifar100", "champion", gone.version)
    run_id = runs.create_run(cfg, "test")
    with pytest.raises(
        RegistryError, match="Could not download champion v1 to compare with it .* --resume decides"
    ):
        _register(cfg, tmp_path, 3, split, run_id)
    (version,) = [v for v in client.search_model_versions("name = 'vit-cifar100'") if v.run_id == run_id]
    assert "promotion" not in version.tags and _champion(cfg) == "1"  # undecided, nothing moved


def test_a_champion_whose_run_the_store_cannot_deliver_now_is_no_decision(cfg, tmp_path, monkeypatch):
    """Its model downloads, its run's artifacts (training-image digests, statistics) do not: an outage.
    Both used to read as "unknown": the comparison went on without them and a drift gate said "not computed"."""
    from vit_pipeline.data_validation import champion_statistics
    from vit_pipeline.errors import TrackingUnavailable

    split = labelled_split(COUNTS)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = tracking.client(cfg)
    # The champion's run keeps its artifacts behind a server that does not answer (a real refused connection).
    elsewhere = client.create_experiment(
        "elsewhere", f"http://127.0.0.1:{free_port()}/api/2.0/mlflow-artifacts/artifacts/x"
    )
    run = client.create_run(elsewhere)
    model_dir = tmp_path / "champion-model"
    model_dir.mkdir()
    constant_classifier(model_dir / "model.onnx", len(split.class_names), 0)
    client.create_registered_model("vit-cifar100")
    version = client.create_model_version("vit-cifar100", str(model_dir), run.info.run_id)
    client.set_model_version_tag("vit-cifar100", version.version, "dataset", cfg.dataset_tag)
    client.set_registered_model_alias("vit-cifar100", "champion", version.version)

    with pytest.raises(TrackingUnavailable, match="drift was not computed: --resume"):
        champion_statistics(cfg)
    run_id = runs.create_run(cfg, "test")
    with pytest.raises(
        RegistryError, match="Could not download champion v1's data/seen_images.npz .* --resume"
    ):
        _register(cfg, tmp_path, 3, split, run_id)
    (candidate,) = [v for v in client.search_model_versions("name = 'vit-cifar100'") if v.run_id == run_id]
    assert "promotion" not in candidate.tags and _champion(cfg) == "1"


def test_other_classes_other_dataset_and_policies(cfg, tmp_path):
    split = labelled_split(COUNTS)
    _register(cfg, tmp_path, 0, split)
    renamed = labelled_split(COUNTS)
    renamed = renamed.__class__(renamed.images, renamed.labels, ["a", "b", "c", "d"], renamed.data_digest)
    other_classes, _ = _register(cfg, tmp_path, 3, renamed)
    assert not other_classes.promoted and "other classes" in other_classes.reason
    coarse = cfg.__class__(
        **{**cfg.to_dict(), "label_mode": "coarse", "registered_model_name": "vit-cifar100"}
    )
    other, _ = _register(coarse, tmp_path, 3, split)
    assert not other.promoted and "trained on 'cifar100'" in other.reason
    never = cfg.__class__(**{**cfg.to_dict(), "promotion_policy": "never"})
    assert not _register(never, tmp_path, 3, split)[0].promoted
    always = cfg.__class__(**{**cfg.to_dict(), "promotion_policy": "always"})
    assert _register(always, tmp_path, 1, split)[0].promoted
    assert _champion(cfg) == "5"
    # The registered artifact is the served ONNX model, loadable by MLflow's onnx flavour.
    import mlflow.onnx

    with tracking.fluent_store(cfg):  # the pipeline leaves MLflow's process-wide store alone
        loaded = mlflow.onnx.load_model("models:/vit-cifar100@champion")
    assert [i.name for i in loaded.graph.input] == ["images"]


def test_a_run_registers_once(cfg, tmp_path):
    split = labelled_split(COUNTS)
    first, run_id = _register(cfg, tmp_path, 2, split)
    again, _ = _register(cfg, tmp_path, 2, split, run_id=run_id)  # e.g. a resumed flow run
    assert again.version == first.version and again.promoted and again.reason == first.reason
    assert len(tracking.client(cfg).search_model_versions("name = 'vit-cifar100'")) == 1


# ---- a real `mlflow server`, behind a proxy that can fail the champion read ----


def test_server_failing_during_the_champion_read_promotes_nothing(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy = FaultyProxy(mlflow_server)
    try:
        cfg = make_config("cifar100", {"tracking_uri": proxy.url, "registered_model_name": "fault-read"})
        split = labelled_split(COUNTS)
        first, _ = _register(cfg, tmp_path, 0, split)
        assert first.promoted
        proxy.armed = True
        with pytest.raises(RegistryError, match="Cannot read the 'champion' of 'fault-read'"):
            _register(cfg, tmp_path, 3, split)
        assert proxy.failed >= 1
        proxy.armed = proxy.failing = False
        client = tracking.client(cfg)
        assert _champion(cfg, "fault-read") == "1"  # the error did not count as "no champion"
        v2 = client.get_model_version("fault-read", "2")
        assert "promotion" not in v2.tags
        # A retry of the stage (same run) reuses version 2 and decides properly.
        retried, _ = _register(cfg, tmp_path, 3, split, run_id=v2.run_id)
        assert retried.version == "2" and retried.promoted and _champion(cfg, "fault-read") == "2"
    finally:
        proxy.close()


WORKER = Path(__file__).with_name("registry_worker.py")
# Each worker holds the registry lock this long between reading the champion and moving the alias
# (registry.py's test hook). The barrier releases the workers before `register_onnx`, whose logging
# spreads their arrival at the lock (0.2-0.5 s measured); a longer hold makes unserialised critical
# sections overlap, so without the lock two workers read the same champion and `race` says so.
HOLD_SECONDS = 1.5


def _champion_now(tracking_uri: str, name: str, labels) -> tuple[str, float] | None:
    """(version, accuracy on the split) of the champion, from its ``favoured`` tag; None without one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        champion = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(champion.version), float((labels == int(champion.tags["favoured"])).mean())


def _one_at_a_time(start, results: list[dict], labels):
    """An order of the workers that, deciding one at a time from ``start``, gives what each one reported.

    Returns the order and the champion it ends with, or (None, None) when no order does: two workers
    decided on the same champion (the read-compare-set was not serialised).
    """
    for order in itertools.permutations(results):
        current = start
        for r in order:
            accuracy = float((labels == r["favoured"]).mean())
            promoted = current is None or accuracy >= current[1]
            seen = None if current is None else pytest.approx(current[1])
            if r["promoted"] != promoted or r["champion_test_accuracy"] != seen:
                break
            if promoted:
                current = (r["version"], accuracy)
        else:
            return [r["version"] for r in order], current
    return None, None


def race(
    tracking_uri: str, name: str, favoured: list[int], split_path: Path, tmp_path: Path, env: dict
) -> list[dict]:
    """Registers one constant model per entry of ``favoured``, each in its own process, released together.

    Checks that the decisions were serialised: some one-at-a-time order of the workers explains what
    each one saw as champion and decided, and the champion afterwards is the one that order leaves.
    """
    import numpy as np

    labels = np.load(split_path)["labels"]
    start = _champion_now(tracking_uri, name, labels)
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = []
    for i, cls in enumerate(favoured):
        ready = tmp_path / f"ready-{go.name}-{i}"
        args = [
            sys.executable,
            str(WORKER),
            tracking_uri,
            name,
            str(cls),
            str(split_path),
            str(ready),
            str(go),
        ]
        held = {**env(i), "VIT_PIPELINE_REGISTRY_HOLD_SECONDS": str(HOLD_SECONDS)}
        procs.append((subprocess.Popen(args, env=held, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                      ready))  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not all(r.exists() for _, r in procs):
            assert time.monotonic() < deadline, "workers never got ready"
            assert all(p.poll() is None for p, _ in procs), [
                p.communicate() for p, _ in procs if p.poll() is not None
            ]
            time.sleep(0.05)
        go.touch()  # the barrier: every worker is waiting for this file
        results = []
        for proc, _ in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    order, end = _one_at_a_time(start, results, labels)
    assert order is not None, f"no one-at-a-time order explains these decisions from {start}: {results}"
    assert _champion_now(tracking_uri, name, labels) == end, (order, results)
    return results


def test_concurrent_registrations_leave_the_best_champion(mlflow_server, tmp_path):
    """Three processes register at the same moment, two rounds: the champion is always the best so far."""
    split = labelled_split(COUNTS)
    split_path = tmp_path / "split.npz"
    import numpy as np

    np.savez(split_path, images=split.images, labels=split.labels)
    home = tmp_path / "home"  # one host: the processes share the pipeline home (and its registry lock)
    env = {**os.environ, "VIT_PIPELINE_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("PREFECT_API_URL", None)
    name, seen = "race", []
    for favoured in ([0, 2, 1], [1, 3, 2]):
        results = race(mlflow_server, name, favoured, split_path, tmp_path, lambda i: env)
        seen += [(COUNTS[r["favoured"]], r["version"]) for r in results]
        client = tracking.client(make_config("cifar100", {"tracking_uri": mlflow_server}))
        champion = client.get_model_version_by_alias(name, CHAMPION)
        best = max(acc for acc, _ in seen)
        assert COUNTS[int(champion.tags["favoured"])] == best, (seen, champion.version, results)
        # Each worker was judged against the champion of its moment (versions are numbered before the lock,
        # so their order says nothing about the order of decisions): a promoted model was at least as good
        # as every model of earlier rounds.
        earlier = [acc for acc, _ in seen[: -len(results)]]
        for r in results:
            if r["promoted"] and earlier:
                assert COUNTS[r["favoured"]] >= max(earlier), (seen, results)
    assert len(client.search_model_versions(f"name = '{name}'")) == 6


def test_no_champion_survives_a_task_runner_s_pickling():
    import copy
    import pickle

    from vit_pipeline.registry import NoChampion

    error = NoChampion("vit-x")
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert (
            str(again) == "No version of 'vit-x' holds the alias 'champion' (yet)" and again.name == "vit-x"
        )


def test_a_registry_lock_of_the_longest_name_is_a_file_the_file_system_takes(tmp_path, monkeypatch):
    """Every name the config allows (256 characters) has a lock file, and names that differ only in characters
    a file name cannot hold have their own (the name was the whole file name: 256 characters were refused)."""
    from vit_pipeline.registry import _file_lock

    monkeypatch.setenv("VIT_PIPELINE_HOME", str(tmp_path))
    for name in ("v" * 256, "vit pets", "vit_pets", "vit-é" * 50):
        with _file_lock(name, 1):
            pass
    assert len(list((tmp_path / "locks").iterdir())) == 4


def test_the_outcome_a_run_prints_is_where_the_alias_is_now():
    """A resumed run whose promotion was replaced since printed "champion" while a later version held it."""
    from vit_pipeline.registry import Registration

    def outcome(promoted, champion):
        return Registration("m", "2", "models:/m/2", promoted, "r", champion).outcome

    assert outcome(True, "2") == "champion" and outcome(False, "1") == "not promoted"
    assert outcome(True, "3") == "promoted, since replaced by v3" and outcome(True, None) == "promoted"


def test_a_withdrawal_never_hands_the_alias_back_to_a_withdrawn_version(cfg, tmp_path):
    """v1 champion; v2 and then v3 promoted; v2's run stops (the alias stays on v3), then v3's: the alias went
    back to v2, a withdrawn model of a failed run. It goes back past it to v1."""
    from vit_pipeline.registry import withdraw_stopped

    split = labelled_split([2, 4, 8, 16])  # class 3 the commonest: each promoted version is better
    _register(cfg, tmp_path, 0, split)
    _, second = _register(cfg, tmp_path, 1, split)
    _, third = _register(cfg, tmp_path, 3, split)
    client = tracking.client(cfg)
    assert _champion(cfg) == "3", [v.tags.get("promotion") for v in client.search_model_versions("")]
    withdraw_stopped(client, "vit-cifar100", second, "its model card failed")
    assert _champion(cfg) == "3"
    withdraw_stopped(client, "vit-cifar100", third, "KeyboardInterrupt")
    assert _champion(cfg) == "1"
