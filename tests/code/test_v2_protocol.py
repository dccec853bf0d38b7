"""The Open Inference Protocol (KServe v2) on the consumer, called by third-party clients.

A real uvicorn process serves a real export, on ONNX Runtime and on OpenVINO (f32);
``tritonclient.http`` (NVIDIA's client, JSON and binary tensors) and the ``kserve`` SDK's
``InferenceRESTClient`` call it; the answers must equal ONNX Runtime in-process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import numpy as np
import onnx
import pytest

from tests.conftest import free_port, real_images, stop, wait_for_http

pytestmark = pytest.mark.integration  # a real server process

TEMPERATURE = 0.5


# Engine -> how close its logits are to ONNX Runtime's in-process (OpenVINO sums in another order).
ENGINES = {"onnxruntime": 1e-5, "openvino-f32": 1e-4}


@pytest.fixture(scope="module", params=list(ENGINES))
def served(tiny_export, tmp_path_factory, request):
    """The tiny export with a calibrated temperature, served by ``python -m vit_consumer --engine E``."""
    _, path, _ = tiny_export
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props} | {"temperature": str(TEMPERATURE)}
    onnx.helper.set_model_props(model, meta)
    file = tmp_path_factory.mktemp("v2") / "vit-tiny.onnx"
    onnx.save(model, str(file))
    port = free_port()
    cmd = [sys.executable, "-m", "vit_consumer", "--model", str(file), "--engine", request.param, "serve",
           "--port", str(port), "--max-batch-size", "8", "--no-choose"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/health/ready", proc, timeout=120)
        yield file, port, request.param
    finally:
        stop(proc)


def _reference(file, images):
    import onnxruntime as ort
    from vit_consumer.contract import softmax

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images})[0]
    return logits, softmax(logits, TEMPERATURE)


def test_tritonclient_json_and_binary_tensors(served):
    import tritonclient.http as httpclient

    file, port, engine = served
    name = "vit-cifar100"  # the file's dataset: no registry name to go by
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(name, model_version="1")
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3]}]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "probabilities"}
    assert float(meta["parameters"]["temperature"]) == TEMPERATURE
    # Which engine serves, at what precision, in the metadata and /health alike.
    assert meta["platform"] == f"{engine.split('-')[0]}_onnx" and meta["parameters"]["engine"] == engine
    health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    assert (health["engine"], health["precision"]) == (engine.split("-")[0], meta["parameters"]["precision"])
    assert health["precision"] == "fp32"  # onnxruntime, and openvino-f32
    images = real_images(5).astype(np.float32)
    logits, probs = _reference(file, images)
    for binary in (False, True):
        inp = httpclient.InferInput("images", list(images.shape), "FP32")
        inp.set_data_from_numpy(images, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "probabilities")
        ]
        result = client.infer(name, [inp], outputs=outputs, request_id="r1")
        np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=ENGINES[engine])
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=ENGINES[engine] / 10)
        assert result.get_response()["id"] == "r1"
    with pytest.raises(Exception, match="Unknown model 'nope'"):
        client.get_model_metadata("nope")
    with pytest.raises(Exception, match="Expected shape"):
        bad = httpclient.InferInput("images", [1, 8, 8, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.float32))
        client.infer(name, [bad])


def test_kserve_rest_client(served):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    file, port, engine = served
    name = "vit-cifar100"
    images = real_images(3).astype(np.float32)
    logits, probs = _reference(file, images)

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        base = f"http://127.0.0.1:{port}"
        try:
            ready = await client.is_server_ready(base)
            model_ready = await client.is_model_ready(base, name)
            inp = InferInput(name="images", shape=list(images.shape), datatype="FP32")
            inp.set_data_from_numpy(images, binary_data=False)
            answer = await client.infer(base, InferRequest(model_name=name, infer_inputs=[inp], request_id="k1"),
                                        model_name=name)  # fmt: skip
        finally:
            await client.close()
        return ready, model_ready, answer

    ready, model_ready, answer = asyncio.run(call())
    assert ready and model_ready
    out = {o.name: o.as_numpy() for o in answer.outputs}
    np.testing.assert_allclose(out["logits"], logits, atol=ENGINES[engine])
    np.testing.assert_allclose(out["probabilities"], probs, atol=ENGINES[engine] / 10)


def test_protocol_errors_are_one_line_json(served):
    _, port, _ = served
    base = f"http://127.0.0.1:{port}/v2/models"
    ok = {"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "FP32", "data": [0.0] * 3072}]}
    assert httpx.post(f"{base}/vit-cifar100/infer", json=ok).status_code == 200
    cases = [
        (f"{base}/other/infer", ok, 404, "Unknown model 'other'"),
        (f"{base}/vit-cifar100/versions/9/infer", ok, 404, "Unknown version '9'"),
        (f"{base}/vit-cifar100/infer", {"inputs": [{**ok["inputs"][0], "datatype": "BYTES"}]}, 400,
         "Unsupported datatype 'BYTES'"),
        (f"{base}/vit-cifar100/infer", {"inputs": [{**ok["inputs"][0], "data": [1.0]}]}, 400, "1 values for shape"),
        (f"{base}/vit-cifar100/infer", {**ok, "outputs": [{"name": "classes"}]}, 400, "Unknown output 'classes'"),
        (f"{base}/vit-cifar100/infer", {"inputs": [{**ok["inputs"][0], "data": [300.0] * 3072}]}, 400,
         "Expected raw pixel values in [0, 255]"),
    ]  # fmt: skip
    for url, doc, code, message in cases:
        response = httpx.post(url, json=doc)
        assert response.status_code == code, (url, response.text)
        assert message in response.json()["error"] and "\n" not in response.json()["error"]
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 100}}]}).encode()  # fmt: skip
    response = httpx.post(f"{base}/vit-cifar100/infer", content=header + b"\0" * 100,
                          headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert response.status_code == 400 and "binary_data_size 100 does not match" in response.json()["error"]
    assert httpx.post(f"{base}/vit-cifar100/infer", content=b"{nope").status_code == 400
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'vit_consumer_requests_total{code="404"}' in metrics  # the same metrics as /predict
