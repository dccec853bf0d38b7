"""The serving contract (vit_consumer.contract): one statement, imported on both sides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vit_consumer import contract


def test_metadata_states_the_tensors_and_the_classes():
    meta = contract.build_metadata(["cat", "dog"], (32, 32, 3), producer_version="9.9", dataset="pets",
                                   test_accuracy=0.5, run_id="r1", extra={"opset": 17})  # fmt: skip
    assert all(isinstance(v, str) for v in meta.values())
    assert contract.class_names(meta) == ["cat", "dog"]
    assert json.loads(meta[contract.META_INPUT_SHAPE]) == [None, 32, 32, 3]
    assert meta[contract.META_INPUT_NAME] == "images" and meta[contract.META_OUTPUT_NAME] == "logits"
    assert meta[contract.META_TEST_ACCURACY] == "0.500000" and meta["opset"] == "17"
    assert contract.class_names({}) is None


def test_pipeline_export_writes_the_contracts_metadata():
    from vit_pipeline import __version__
    from vit_pipeline.export import build_metadata

    meta = build_metadata(["a", "b"], (8, 8, 3), dataset="d")
    assert meta == contract.build_metadata(["a", "b"], (8, 8, 3), producer_version=__version__, dataset="d")


def test_manifest_round_trip_and_bad_files(tmp_path):
    manifest = contract.CandidatesManifest(
        "optimized", 0.995, {"int8-static": {"file": "x.onnx", "top1_agreement": 1.0}}
    )
    path = manifest.write(tmp_path)
    assert path.name == contract.MANIFEST_NAME
    assert contract.CandidatesManifest.read(path) == manifest
    assert contract.CandidatesManifest.find(tmp_path) == manifest
    assert manifest.files(tmp_path) == {"int8-static": tmp_path / "x.onnx"}
    assert contract.CandidatesManifest.find(tmp_path / "none") is None
    gated = contract.CandidatesManifest("optimized", 0.995, {}, {"file": "serving_gate.npz", "images": 4})
    assert contract.CandidatesManifest.read(gated.write(tmp_path)) == gated
    assert gated.gate_file(tmp_path) == tmp_path / "serving_gate.npz" and manifest.gate_file(tmp_path) is None
    for text in (
        "not json",
        '{"candidates": {}}',
        '{"served_variant": "o", "min_agreement": 1, "candidates": {"a": {}}}',
        # A manifest from a store names files beside it, never elsewhere.
        '{"served_variant": "o", "min_agreement": 1, "candidates": {"a": {"file": "../../etc/x.onnx"}}}',
        '{"served_variant": "o", "min_agreement": 1, "candidates": {}, "gate": {"file": "/tmp/g.npz"}}',
        '{"served_variant": "o", "min_agreement": 1, "candidates": {}, "gate": "g.npz"}',
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match="Not a candidates manifest"):
            contract.CandidatesManifest.read(path)


def test_unusable_gate_images_are_ignored_with_a_warning(tmp_path, caplog):
    """A gate file that is not an npz of the model's input shape (or holds pickles) is no gate at all."""
    import numpy as np
    from vit_consumer.candidates import registered_gate

    folder = tmp_path / contract.REGISTERED_DIR
    folder.mkdir()
    contract.CandidatesManifest("o", 0.995, {}, {"file": "g.npz", "images": 2}).write(folder)
    model = tmp_path / "model.onnx"
    np.savez(folder / "g.npz", images=np.zeros((2, 8, 8, 3), np.uint8), logits=np.zeros((2, 3), np.float32))
    assert registered_gate(model, (8, 8, 3)).images.shape == (2, 8, 8, 3)
    assert registered_gate(model, (32, 32, 3)) is None  # another model's images
    np.savez(folder / "g.npz", images=np.array([{"a": 1}], dtype=object), logits=np.zeros((1, 3)))
    assert registered_gate(model, (8, 8, 3)) is None  # object arrays are refused, never unpickled
    (folder / "g.npz").write_bytes(b"not an npz")
    assert registered_gate(model, (8, 8, 3)) is None
    assert sum("Ignoring" in r.message for r in caplog.records) == 3


def test_fastest_is_the_highest_geometric_mean():
    # b is half as fast alone and 1.5x faster at batch 64: a mean of img/s would pick b (175 > 150),
    # the geometric mean weighs the two batch sizes alike and picks a (141 > 122).
    best, scores = contract.fastest({"a": [100.0, 200.0], "b": [50.0, 300.0]})
    assert best == "a"
    assert scores == {"a": pytest.approx((100 * 200) ** 0.5), "b": pytest.approx((50 * 300) ** 0.5)}
    assert contract.geometric_mean([1.0, 0.0]) == 0.0  # did not run at one batch size: never the fastest
    with pytest.raises(ValueError, match="throughputs >= 0"):
        contract.geometric_mean([1.0, -1.0])
    with pytest.raises(ValueError, match="at least one"):
        contract.fastest({})


def test_softmax_and_top_k():
    logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
    probs = contract.softmax(logits)
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    cooler = contract.softmax(logits, temperature=2.0)
    np.testing.assert_allclose(cooler, contract.softmax(logits / 2.0), rtol=1e-6)
    assert contract.softmax(np.array([[1000.0, 0.0]])).tolist() == [[1.0, 0.0]]  # no overflow
    top = contract.top_k(logits, ["a", "b", "c"], k=2)
    assert [[p["label"] for p in row] for row in top] == [["b", "c"], ["a", "b"]]  # ties: lower index first
    assert len(contract.top_k(logits, ["a", "b", "c"], k=99)[0]) == 3
    with pytest.raises(ValueError, match="temperature"):
        contract.softmax(logits, temperature=0)


def test_providers_env_and_its_old_name(monkeypatch):
    monkeypatch.delenv(contract.PROVIDERS_ENV, raising=False)
    monkeypatch.delenv("VIT_CONSUMER_PROVIDERS", raising=False)
    assert contract.requested_providers() is None
    monkeypatch.setenv(contract.PROVIDERS_ENV, " CUDAExecutionProvider , CPUExecutionProvider ")
    assert contract.requested_providers() == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert contract.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.delenv(contract.PROVIDERS_ENV)
    monkeypatch.setenv("VIT_CONSUMER_PROVIDERS", "CPUExecutionProvider")
    with pytest.warns(DeprecationWarning, match="VIT_PROVIDERS"):
        assert contract.requested_providers() == ("CPUExecutionProvider",)


def test_gpu_providers_only_where_a_gpu_is_visible(monkeypatch, tmp_path):
    """The detection reads the device node and CUDA_VISIBLE_DEVICES, not the build's provider list."""
    import onnxruntime as ort

    monkeypatch.delenv(contract.PROVIDERS_ENV, raising=False)
    monkeypatch.delenv("VIT_CONSUMER_PROVIDERS", raising=False)
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: every)  # what onnxruntime-gpu lists anywhere
    monkeypatch.setattr(contract, "gpu_visible", lambda: False)
    assert contract.default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(contract, "gpu_visible", lambda: True)
    assert contract.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert contract.default_providers((contract.TENSORRT, contract.CUDA)) == every
    monkeypatch.undo()
    node = contract.Path("/dev/nvidiactl").exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert contract.gpu_visible() is False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert contract.gpu_visible() is node


def test_every_image_suffix_training_reads_is_a_format_the_service_reads():
    """An image folder's files (by suffix) and the service's image bodies: one list of formats on both sides."""
    from PIL import Image
    from vit_consumer import contract

    from vit_pipeline.data import IMAGE_SUFFIXES

    formats = Image.registered_extensions()
    assert {suffix: formats.get(suffix) for suffix in IMAGE_SUFFIXES if formats.get(suffix) not in
            contract.IMAGE_FORMATS} == {}  # fmt: skip


def test_the_consumer_reading_the_registry_sends_no_usage_pings(tmp_path):
    """MLflow 3 pings its telemetry endpoint unless told not to; serving pods have no business doing so."""
    import os
    import subprocess
    import sys

    code = (
        "from vit_consumer.mlflow_store import store_uris\n"
        f"with store_uris('sqlite:///{tmp_path / 'm.db'}'):\n"
        "    import os\n"
        "    print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))\n"  # MLflow's own test says no in any CI or pytest
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "true", out.stderr[-1000:]


def test_what_counts_as_a_store_that_did_not_answer():
    """An outage decides nothing (retried, resumed); a missing file or a refused value is an answer.
    MLflow gathers a download's failures into one message and drops their causes: the text must do."""
    import requests
    from mlflow.exceptions import MlflowException
    from vit_consumer.mlflow_store import unavailable

    def gathered(error: str) -> MlflowException:
        return MlflowException("The following failures occurred while downloading one or more artifacts from "
                               f"http://mlflow:5000/api/2.0/mlflow-artifacts/artifacts/1/abc:\n##### File m/model.onnx "
                               f"#####\n{error}")  # fmt: skip

    for outage in (
        requests.exceptions.ChunkedEncodingError(
            "Connection broken: IncompleteRead(1024 bytes read, 9 more)"
        ),
        requests.ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): Read timed out."),
        requests.ConnectionError(
            "('Connection aborted.', RemoteDisconnected('Remote end closed connection'))"
        ),
        requests.ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded"),
    ):
        assert unavailable(outage), outage
        assert unavailable(gathered(str(outage))), outage  # the cause dropped, its text kept
    for answer in (
        gathered("No such artifact: 'data/statistics.json'"),
        MlflowException("Changing param values is not allowed", error_code="INVALID_PARAMETER_VALUE"),
        ValueError("A total of 2 objects could not be loaded"),
    ):
        assert not unavailable(answer), answer


def test_a_wrong_tracking_address_is_not_an_outage():
    """A 404 or 401 from the health probe is the same answer next time; refused or a 5xx may not be."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vit_consumer.mlflow_store import probe

    from tests.conftest import free_port

    class Status(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            code = int(self.path.strip("/").split("/")[0])
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert probe(f"{base}/200") == (None, False)
        assert probe(f"{base}/404") == ("HTTP 404 Not Found", False)
        assert probe(f"{base}/401")[1] is False and probe(f"{base}/503")[1] is True
        assert probe(f"http://127.0.0.1:{free_port()}")[1] is True  # refused
        assert probe("http://[not a url")[1] is False
    finally:
        server.shutdown()
