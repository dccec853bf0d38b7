"""Shared fixtures: an isolated pipeline home, tiny configs, tiny datasets."""

from __future__ import annotations

import atexit
import io
import os
import pickle
import shutil
import socket
import tarfile
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# `mlflow server` otherwise starts seven huey job consumers (GenAI jobs this project does not use):
# measured 51 CPU-s against 11 CPU-s for a server start here, on a 2-core CI machine.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# Each pytest process (each xdist worker) has its own Prefect home, so the temporary Prefect
# servers that `vit-pipeline run` starts in tests never share one SQLite database.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vit-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

ASSETS = Path(__file__).parent / "assets"
CIFAR_CUT = ASSETS / "cifar-100-cut.tar.gz"

# A ViT small enough to train in seconds; same code path as the real presets.
TINY = {
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 16,
    "num_heads": 2,
    "transformer_layers": 1,
    "transformer_units": (32, 16),
    "mlp_head_units": (32,),
    "epochs": 2,
    "batch_size": 32,
}


# The files that take longest (``pytest --durations=100``, summed per file: 45-180 s each on 2 cores, 2026-12-08),
# slowest first. Scheduling only, every test still runs: under ``-n 2 --dist loadfile`` pytest-xdist hands out
# files in collection order (see ``pytest_configure``), so the long ones start first and the two workers end
# together; by default it starts the files with the most tests first, which left the longest for the end.
SLOW_FIRST = (
    "tests/code/test_finetune_flow.py", "tests/code/test_flow.py", "tests/code/test_sweep.py",
    "tests/code/test_reliability.py", "tests/code/test_services.py", "tests/code/test_registry.py",
    "tests/code/test_consumer.py", "tests/code/test_runs.py", "tests/model/test_optimize.py",
    "tests/code/test_serving.py",
)  # fmt: skip


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))


@pytest.fixture(autouse=True)
def pipeline_home(tmp_path, monkeypatch):
    """Every test gets its own VIT_PIPELINE_HOME and local MLflow store.

    The pipeline sets no process-wide MLflow state (``tracking.fluent_store`` sets
    it for one block and puts it back), so nothing of MLflow is reset here
    (``test_runs`` checks that a run through the pipeline leaves none behind).
    """
    home = tmp_path / "home"
    monkeypatch.setenv("VIT_PIPELINE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return home


@pytest.fixture(autouse=True)
def python_sigint():
    """Every test starts and ends with Python's own SIGINT handler (it raises KeyboardInterrupt): a handler a
    library left installed in an xdist worker (one that does not raise) made a later Ctrl-C test in the same
    worker see its stage's error instead of the KeyboardInterrupt, depending on which files the worker ran."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cifar_members(n_train: int = 20, n_test: int = 10, num_classes: int = 5, seed: int = 0) -> dict:
    """Official cifar-100-python members (Python 2 style: bytes keys) with random pixels."""
    rng = np.random.default_rng(seed)

    def batch(n: int, name: bytes) -> dict:
        fine = [i % num_classes for i in range(n)]
        return {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": name,
            b"fine_labels": fine,
            b"coarse_labels": [f % 2 for f in fine],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }

    return {
        "meta": {
            b"fine_label_names": [f"class{i}".encode() for i in range(num_classes)],
            b"coarse_label_names": [b"even", b"odd"],
        },
        "train": batch(n_train, b"training batch 1 of 1"),
        "test": batch(n_test, b"testing batch 1 of 1"),
    }


def write_cifar_tar(path: Path, members: dict | None = None, skip: tuple[str, ...] = ()) -> Path:
    members = members or cifar_members()
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            if name in skip:
                continue
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=4)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_cifar_dir(root: Path, members: dict | None = None) -> Path:
    members = members or cifar_members()
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name, obj in members.items():
        (base / name).write_bytes(pickle.dumps(obj, protocol=4))
    return base


@pytest.fixture
def tiny_overrides() -> dict:
    return dict(TINY)


@pytest.fixture(scope="session")
def real_cut():
    """The committed real CIFAR-100 images: (x_train, y_train, x_test, y_test, names)."""
    from vit_pipeline.data import read_cifar100

    return read_cifar100(CIFAR_CUT)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, real_cut):
    """A tiny untrained ViT adapted on real images, and its checked ONNX export."""
    from vit_pipeline.config import make_config
    from vit_pipeline.export import build_metadata, export_onnx
    from vit_pipeline.model import build_vit

    x_train, _, _, _, names = real_cut
    cfg = make_config("cifar100", TINY)
    model = build_vit(cfg, num_classes=100, train_images=x_train)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    meta = build_metadata(names, (32, 32, 3), dataset="cifar100", test_accuracy=0.5, run_id="r123")
    info = export_onnx(model, path, meta)
    return model, path, info


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, timeout: float = 60.0) -> None:
    """Polls ``url`` until it answers 200; fails early if ``proc`` died."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}: {out[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except Exception:
        proc.kill()
        proc.wait(timeout=5)


def start_group(cmd, env, log, cwd):
    """Starts ``cmd`` in its own process group (so its children can be stopped with it)."""
    import subprocess

    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(proc) -> None:
    """SIGTERM to the process group, SIGKILL after 20 s."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def constant_classifier(
    path: Path, num_classes: int, favoured: int, class_names: list[str] | None = None
) -> Path:
    """A real ONNX image classifier (the pipeline's contract) that always predicts ``favoured``.

    Its accuracy on any split is the share of ``favoured`` in the labels, so
    registry tests know the truth in advance.
    """
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = np.linspace(0.0, 0.5, num_classes, dtype=np.float32)
    bias[favoured] = 1.0
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["zero"]),
            helper.make_node("Add", ["zero", "b"], ["logits"]),
        ],
        "constant",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        [
            numpy_helper.from_array(np.zeros((3072, num_classes), np.float32), "w"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    names = class_names or [f"class{i}" for i in range(num_classes)]
    onnx.helper.set_model_props(model, {"class_names": json.dumps(names)})
    onnx.save(model, str(path))
    return path


def labelled_split(counts: list[int], seed: int = 0):
    """A TestSplit with ``counts[c]`` images of class ``c`` (random pixels)."""
    from vit_pipeline.registry import TestSplit

    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return TestSplit(images, labels, [f"class{i}" for i in range(len(counts))], data_digest=f"digest-{seed}")


def real_images(n: int) -> np.ndarray:
    """The first ``n`` real CIFAR-100 test images of the committed cut (uint8, NHWC)."""
    from vit_pipeline.data import read_cifar100

    return read_cifar100(CIFAR_CUT)[2][:n]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` (SQLite store, proxied artifacts) shared by the HTTP tests.

    Tests sharing it use their own registered model and experiment names.
    """
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, timeout=90)
    yield url
    stop(proc)


BLOCKED = ("tensorflow", "keras", "tf2onnx", "tf_keras")


@pytest.fixture(scope="session")
def no_tf_env(tmp_path_factory):
    """Environment whose Python cannot import TensorFlow, Keras or tf2onnx."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("no_tf")
    for name in BLOCKED:
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked in the consumer test')\n"
        )
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    check = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True
    )
    assert check.returncode != 0 and "tensorflow is blocked" in check.stderr
    return env


class PtyProcess:
    """A child whose stdout and stderr are a pseudo-terminal (as on a user's screen).

    A thread drains the terminal while the child runs (a full terminal buffer would
    block the child's writes); ``output()`` is everything it printed so far.
    """

    def __init__(self, cmd: list[str], env: dict):
        import pty
        import subprocess
        import threading

        self._master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
                                     close_fds=True)  # fmt: skip
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            self._chunks.append(data)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def output(self) -> str:
        """What the terminal received, without colour and cursor escapes."""
        import re

        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(self._chunks).decode(errors="replace"))


class FaultyProxy:
    """Forwards HTTP to the tracking server; can answer 503 to the champion read.

    Armed (``armed = True``), it starts failing ``GET registered-models/alias``
    (the champion read) once a model version has been created: the registration
    itself went through, the champion read right after it fails. ``drop`` (a
    predicate of the request path) closes the connection unanswered instead, and
    ``truncate`` after half the answer's body: a store gone in the middle of a download.
    """

    def __init__(self, upstream: str):
        self.upstream, self.armed, self.failing, self.failed = upstream, False, False, 0
        self.drop = self.truncate = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                import urllib.error
                import urllib.request

                if proxy.drop is not None and proxy.drop(self.path):
                    proxy.failed += 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy.failing and self.command == "GET" and "/registered-models/alias" in self.path:
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command)
                for key in ("Content-Type", "Accept"):
                    if self.headers.get(key):
                        req.add_header(key, self.headers[key])
                try:
                    resp = urllib.request.urlopen(req, timeout=60)
                except urllib.error.HTTPError as err:
                    resp = err
                data = resp.read()
                if proxy.armed and "/model-versions/create" in self.path:
                    proxy.failing = True
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                self.send_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if proxy.truncate is not None and proxy.truncate(self.path) and len(data) > 1:
                    proxy.failed += 1  # the store goes away in the middle of its answer
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def ctrl_c_during(func):
    """``func``, preceded by what a Ctrl-C pressed as it starts does: the SIGINT handler installed then runs
    (as Python runs it, in the main thread; called here, not sent: a real SIGINT to a pytest-xdist worker that
    a library gave a C-level handler ended the worker). Real signals: the command-level tests
    (tests/code/test_reliability.py)."""
    import signal

    def pressed(*args, **kwargs):
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler), handler
        handler(signal.SIGINT, None)
        return func(*args, **kwargs)

    return pressed
