"""The consumer's engines (ONNX Runtime, OpenVINO) and the agreement gate it runs again where it serves."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.conftest import real_images


def _require_openvino() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        pytest.fail("openvino is not importable: install the extra, pip install -e '.[dev,openvino]'")


def _perturbed(src, dst, seed: int = 0) -> None:
    """The same graph and contract with other weights: a candidate that loads but answers differently."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 100:
            init.CopyFrom(numpy_helper.from_array(w + rng.normal(0, 3 * (w.std() + 1e-3), w.shape).astype(w.dtype),
                                                  init.name))  # fmt: skip
    onnx.save(model, str(dst))


def _registered(tmp_path, tiny_export, gate_logits=None, other=True):
    """A registered version's layout: model.onnx, extra_files/ with a manifest, a candidate and the gate."""
    from vit_consumer.contract import CandidatesManifest
    from vit_consumer.engines import OrtEngine

    _, path, _ = tiny_export
    folder = tmp_path / "version"
    (folder / "extra_files").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(path.read_bytes())
    candidates = {}
    if other:
        _perturbed(path, folder / "extra_files" / "model.other.onnx")
        candidates["other"] = {"file": "model.other.onnx", "top1_agreement": 1.0, "test_accuracy": 0.1}
    gate = None
    if gate_logits is not False:
        images = real_images(48)
        logits = OrtEngine(path, ["CPUExecutionProvider"], {}).run(images.astype(np.float32))
        np.savez_compressed(folder / "extra_files" / "serving_gate.npz", images=images,
                            logits=logits if gate_logits is None else gate_logits(logits))  # fmt: skip
        gate = {"file": "serving_gate.npz", "images": 48}
    CandidatesManifest("optimized", 0.995, candidates, gate).write(folder / "extra_files")
    return folder


def test_engine_names_are_checked_in_one_line(tiny_export):
    from vit_consumer.classifier import InputError
    from vit_consumer.engines import parse_spec, spec_label
    from vit_consumer.settings import Settings, SettingsError

    assert parse_spec("openvino-f32") == ("openvino", "f32") and parse_spec("ONNXRuntime") == (
        "onnxruntime",
        "default",
    )
    assert spec_label("openvino", "default") == "openvino" and spec_label("openvino", "f32") == "openvino-f32"
    for bad in ("tensorrt", "onnxruntime-f32", "openvino-bf8"):
        with pytest.raises(ValueError, match=f"Expected an engine among onnxruntime, openvino, openvino-f32. "
                                             f"Received: engine='{bad}'"):  # fmt: skip
            parse_spec(bad)
    with pytest.raises(
        SettingsError, match="engine='tensorrt': expected auto, onnxruntime, openvino or openvino-f32"
    ):
        Settings(engine="tensorrt")
    assert Settings(engine=" OpenVINO-F32 ").engine == "openvino-f32"
    from vit_consumer import OnnxClassifier

    with pytest.raises(InputError, match="Received: engine='tpu'"):
        OnnxClassifier.from_uri(str(tiny_export[1]), engine="tpu")
    out = subprocess.run([sys.executable, "-m", "vit_consumer", "--model", str(tiny_export[1]), "--engine", "tpu",
                          "predict", "x.png"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "engine='tpu'" in out.stderr


def test_openvino_serves_the_same_contract_and_answers(tiny_export):
    _require_openvino()
    import openvino as ov
    from vit_consumer import OnnxClassifier

    _, path, _ = tiny_export
    ort_clf = OnnxClassifier(path, ["CPUExecutionProvider"])
    images = real_images(16).astype(np.float32)
    reference = ort_clf.run(images)
    f32 = OnnxClassifier(path, engine="openvino", precision="f32")
    assert (f32.class_names, f32.input_shape, f32.temperature) == (
        ort_clf.class_names,
        ort_clf.input_shape,
        1.0,
    )
    assert f32.metadata == ort_clf.metadata  # every metadata_props entry, read through OpenVINO
    np.testing.assert_allclose(f32.run(images), reference, atol=1e-4)
    default = OnnxClassifier(path, engine="openvino")
    # The precision reported is the compiled model's own (bf16 where the CPU has it), never the request.
    compiled = ov.Core().compile_model(str(path), "CPU")
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert default.runtime.precision == {"f32": "fp32", "bf16": "bf16"}[hint]
    assert (default.describe()["engine"], default.describe()["precision"]) == (
        "openvino",
        default.runtime.precision,
    )
    assert f32.describe()["precision"] == "fp32" and f32.engine == "openvino-f32"
    assert np.abs(default.run(images) - reference).max() < 0.1  # bf16 moves logits a little
    # Two threads, two infer requests: the answers do not mix.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(f32.run, [images[:8], images[8:]])
    np.testing.assert_allclose(np.concatenate([a, b]), reference, atol=1e-4)


def test_openvino_streams_run_requests_at_once_with_the_same_answers(tiny_export):
    """Streams (OpenVINO's THROUGHPUT hint) change how many requests run at once, never the answers; the
    count served is the compiled model's own, and the start-up timing runs that many at once."""
    _require_openvino()
    from concurrent.futures import ThreadPoolExecutor

    from vit_consumer import InputError, OnnxClassifier
    from vit_consumer.candidates import throughput

    _, path, _ = tiny_export
    images = real_images(16).astype(np.float32)
    one = OnnxClassifier(path, engine="openvino", precision="f32", streams=1)
    two = OnnxClassifier(path, engine="openvino", precision="f32", streams=2)
    assert (one.runtime.parallel, two.runtime.parallel) == (1, 2)
    assert two.describe()["parallel_requests"] == 2
    reference = one.run(images)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(two.run, [images[:8], images[8:]])
    np.testing.assert_allclose(np.concatenate([a, b]), reference, atol=1e-4)
    np.testing.assert_allclose(two.run_alone(images), reference, atol=1e-4)  # a lone batch: every core
    auto = OnnxClassifier(path, engine="openvino", precision="f32", streams=0)  # OpenVINO's choice here
    assert auto.runtime.parallel >= 1
    runs = []
    two_run = two.runtime.run
    two.runtime.run = lambda x: runs.append(threading.get_ident()) or two_run(x)
    assert set(throughput(two, (1,), 0.05)) == {1} and len(set(runs)) == 2  # timed on two threads
    alone = []
    for clf in (one, two):
        run_alone = clf.runtime.run_alone
        clf.runtime.run_alone = lambda x, run_alone=run_alone: alone.append(len(x)) or run_alone(x)
        clf.warm_up((1, 4))
    assert alone == [1, 4]  # the lone batches' compilation is warmed up too, where there is one
    with pytest.raises(InputError, match="streams >= 0"):
        OnnxClassifier(path, engine="openvino", streams=-1)


def test_the_gate_runs_again_where_the_model_is_served(tiny_export, tmp_path):
    """A candidate that loads but disagrees is refused with its figure; OpenVINO competes where it agrees."""
    _require_openvino()
    from vit_consumer import OnnxClassifier

    folder = _registered(tmp_path, tiny_export)
    clf = OnnxClassifier.from_uri(str(folder), choose_for=(1, 4))
    report = clf.candidate
    assert report["gate_agreement"]["other"] < 0.5
    assert (
        report["refused"]["other"].startswith("top-1 agreement with Keras")
        and "48 registered test images" in (report["refused"]["other"])
    )
    # OpenVINO at f32 on the registered file keeps the answers: it was timed against ONNX Runtime. Where
    # OpenVINO's own default is f32 (a CPU without bf16), that one setting is "registered@openvino".
    import openvino as ov
    from vit_consumer.engines import type_name

    default = type_name(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
    f32 = "registered@openvino" if default == "f32" else "registered@openvino-f32"
    assert report["gate_agreement"][f32] == 1.0
    assert {"registered", f32} <= set(report["scores_ips_geomean"])
    assert (
        "other" not in report["scores_ips_geomean"] and "other@openvino" not in report["scores_ips_geomean"]
    )
    assert report["served"] == max(report["scores_ips_geomean"], key=report["scores_ips_geomean"].get)
    assert clf.describe()["engine"] == ("openvino" if "@openvino" in report["served"] else "onnxruntime")


def test_without_gate_images_openvino_is_not_a_candidate(tiny_export, tmp_path):
    _require_openvino()
    from vit_consumer import OnnxClassifier

    folder = _registered(tmp_path, tiny_export, gate_logits=False, other=False)
    report = OnnxClassifier.from_uri(str(folder), choose_for=(1, 4)).candidate
    assert report["served"] == "registered" and report["engine"] == "onnxruntime"
    assert report["refused"]["registered@openvino"].startswith("no gate images registered")


def test_an_engine_asked_for_by_name_must_pass_the_gate(tiny_export, tmp_path):
    _require_openvino()
    from vit_consumer import OnnxClassifier
    from vit_consumer.classifier import InputError

    # Reference logits whose top-1 is another class for every image: nothing can agree with them.
    folder = _registered(tmp_path, tiny_export, gate_logits=lambda x: np.roll(x, 1, axis=1), other=False)
    with pytest.raises(InputError, match=r"registered@openvino-f32 agrees with Keras on 0.00% of the 48 registered "
                                         r"test images, below the gate's 99.5%: serve with another --engine"):  # fmt: skip
        OnnxClassifier.from_uri(str(folder), engine="openvino-f32")
    good = _registered(tmp_path / "good", tiny_export, other=False)
    clf = OnnxClassifier.from_uri(str(good), engine="openvino-f32")
    assert clf.engine == "openvino-f32" and clf.candidate["reason"] == "candidate choice off"


def test_the_service_puts_its_warm_heap_out_of_the_collectors_reach(tiny_export):
    """Full collections walking the loaded libraries' objects held the GIL for 60-120 ms under load (the p99);
    once warm, the service freezes what is alive (``gc.freeze``), so collections walk only what is new."""
    import asyncio
    import gc

    from vit_consumer import OnnxClassifier
    from vit_consumer.server import Service
    from vit_consumer.settings import Settings

    _, path, _ = tiny_export
    service = Service(OnnxClassifier(path), Settings(max_batch_size=8))
    gc.unfreeze()

    async def start_and_stop() -> int:
        await service.start()
        frozen = gc.get_freeze_count()
        await service.stop()
        return frozen

    try:
        assert asyncio.run(start_and_stop()) > 10_000  # the modules, the engine: everything alive then
    finally:
        gc.unfreeze()  # this test process goes on


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fails_on_call", [1, 3])  # in the warm-up, then after the clock started
def test_a_timed_engine_that_fails_raises_its_error_and_never_hangs(workers, fails_on_call):
    """The start-up choice times candidates with ``time_calls``: a candidate that raises (at warm-up, or
    later) must fail its load with that error, not leave the service waiting for ever (or time it at 0)."""
    from vit_consumer.candidates import time_calls

    calls = []

    def run(x):
        calls.append(1)
        if len(calls) >= fails_on_call:
            raise RuntimeError("the kernel failed")
        return x

    raised: list[BaseException] = []

    def timed() -> None:
        try:
            time_calls(run, np.zeros((1, 2)), 0.2, workers)
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=timed, daemon=True)  # daemon: a hang fails the test, not the suite
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "time_calls hung"  # it did, for ever, when a warm-up failed
    assert [str(e) for e in raised] == ["the kernel failed"]


V2, V1 = "0::/\n", "4:cpu,cpuacct:/\n"  # /proc/self/cgroup inside a container with its own cgroup namespace


@pytest.mark.parametrize(
    ("membership", "files", "visible", "expected"),
    [
        (V2, {"cpu.max": "max 100000\n"}, 64, None),  # v2, no quota
        (V2, {"cpu.max": "200000 100000\n"}, 64, 2),  # a pod limited to 2 CPUs on a 64-core node
        (V2, {"cpu.max": "150000 100000\n"}, 64, 2),  # 1.5 CPUs keep two threads busy
        (V2, {"cpu.max": "50000 100000\n"}, 64, 1),
        (V2, {"cpu.max": "400000 100000\n"}, 2, None),  # the quota allows more than the cores it may use
        # A process in a nested cgroup (a systemd slice, no namespace): its own cgroup's quota, not the root's.
        (
            "0::/system.slice/vit.service\n",
            {"cpu.max": "max 100000\n", "system.slice/vit.service/cpu.max": "100000 100000\n"},
            64,
            1,
        ),
        (V1, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 64, None),
        (
            V1,
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            64,
            3,
        ),
        (
            "3:cpu:/vittest\n",
            {
                "cpu/cpu.cfs_quota_us": "-1\n",
                "cpu/cpu.cfs_period_us": "100000\n",
                "cpu/vittest/cpu.cfs_quota_us": "100000\n",
                "cpu/vittest/cpu.cfs_period_us": "100000\n",
            },
            64,
            1,
        ),
        (V2, {"cpu.max": "lots 100000\n"}, 64, None),  # unexpected: no quota known
        (V2, {}, 64, None),  # no cgroup files at all
        ("", {}, 64, None),  # no membership either
    ],
)
def test_a_cpu_quota_sets_the_engines_threads(tmp_path, monkeypatch, membership, files, visible, expected):
    from vit_consumer import engines

    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    monkeypatch.setattr(engines.os, "sched_getaffinity", lambda pid: set(range(visible)))
    assert engines.cpu_budget(root, tmp_path / "self-cgroup") == expected


def test_both_engines_fit_their_threads_and_streams_in_a_cpu_quota(tiny_export, monkeypatch):
    """Under a quota of one CPU, ONNX Runtime runs one intra-op thread and OpenVINO one stream of one thread,
    whatever the cores they see (they would size themselves by those)."""
    _require_openvino()
    from vit_consumer import OnnxClassifier, engines

    _, path, _ = tiny_export
    monkeypatch.setattr(engines, "cpu_budget", lambda: 1)
    ort_clf = OnnxClassifier(path)
    assert ort_clf.runtime.session.get_session_options().intra_op_num_threads == 1
    ov_clf = OnnxClassifier(path, engine="openvino", precision="f32", streams=0)
    assert ov_clf.runtime.parallel == 1
    assert int(ov_clf.runtime.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    np.testing.assert_allclose(ov_clf.run(real_images(4).astype(np.float32)),
                               ort_clf.run(real_images(4).astype(np.float32)), atol=1e-4)  # fmt: skip
