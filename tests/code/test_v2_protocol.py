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


def _text(element) -> str:
    """A BYTES element as tritonclient gives it: str from JSON, bytes from the binary extension."""
    return element.decode() if isinstance(element, bytes) else element


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
    # Compressed requests (tritonclient's request_compression_algorithm) and Triton's classification
    # extension (class_count: each row's top k as "value:index:label", BYTES).
    inp = httpclient.InferInput("images", list(images.shape), "FP32")
    inp.set_data_from_numpy(images, binary_data=True)
    for compression in ("gzip", "deflate"):
        result = client.infer(name, [inp], request_compression_algorithm=compression)
        np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=ENGINES[engine])
    names = json.loads(meta["parameters"]["class_names"])
    for binary in (False, True):
        top3 = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
        rows = client.infer(name, [inp], outputs=top3).as_numpy("probabilities")
        assert rows.shape == (5, 3)
        for row, p in zip(rows, probs, strict=True):
            parsed = [(float(v), int(i), label) for v, i, label in (_text(e).split(":", 2) for e in row)]
            expected = np.argsort(-p, kind="stable")[:3]
            assert [i for _, i, _ in parsed] == list(expected), (parsed, p[expected])
            assert [label for *_, label in parsed] == [names[i] for i in expected]
            np.testing.assert_allclose([v for v, *_ in parsed], p[expected], atol=1e-4)
    with pytest.raises(Exception, match="Unknown model 'nope'"):
        client.get_model_metadata("nope")
    # Triton's model configuration (perf_analyzer and image_client read it): the contract export-serving writes.
    config = client.get_model_config(name, model_version="1")
    assert config["input"] == [{"name": "images", "data_type": "TYPE_FP32", "format": "FORMAT_NHWC",
                                "dims": [32, 32, 3]}]  # fmt: skip
    assert config["output"][0] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [len(names)],
                                   "label_filename": "labels.txt"}  # fmt: skip
    assert config["max_batch_size"] == 8 and config["version_policy"] == {"specific": {"versions": [1]}}
    with pytest.raises(Exception, match="Not Found"):  # an endpoint this server lacks: still {"error": ...}
        client.get_inference_statistics(name)
    shared = httpclient.InferInput("images", list(images.shape), "FP32")
    shared.set_shared_memory("region0", images.nbytes)
    with pytest.raises(Exception, match="asks for shared memory, which this server does not offer"):
        client.infer(name, [shared])
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
    image = ok["inputs"][0]
    no_data = {k: v for k, v in image.items() if k != "data"}
    infer = f"{base}/vit-cifar100/infer"
    cases += [
        (infer, {**ok, "parameters": [1]}, 400, "'parameters' to be an object"),
        (infer, {"inputs": [{**image, "parameters": "x"}]}, 400, "'parameters' to be an object"),
        (infer, {**ok, "outputs": [{"name": "logits", "parameters": 3}]}, 400, "'parameters' to be an object"),
        (infer, {"inputs": [{**image, "shape": [True, 32, 32, 3]}]}, 400, "integer sizes"),
        (infer, {"inputs": [{**image, "shape": [2**32, 2**32], "data": []}]}, 400, "0 values for shape"),
        (infer, {"inputs": [{**image, "shape": [0, 32, 32, 3], "data": []}]}, 400, "Expected 1 to 1024 images"),
        (infer, {**ok, "id": 5}, 400, "'id' to be a string"),
        (infer, {**ok, "outputs": [{"name": "logits", "parameters": {"binary_data": "false"}}]}, 400,
         "'binary_data' to be true or false"),
        (infer, {**ok, "parameters": {"binary_data_output": 1}}, 400, "'binary_data_output' to be true or false"),
        (infer, {"inputs": [{**image, "data": ["1"] * 3072}]}, 400, "must be numeric values"),
        (infer, {"inputs": [{**image, "data": [True] * 3072}]}, 400, "must be numeric values"),
        (infer, {"inputs": [{**image, "datatype": "UINT8", "data": [1.5] * 3072}]}, 400, "must be integers"),
        (infer, {"inputs": [{**image, "datatype": "FP16", "data": [1e6] * 3072}]}, 400, "out of the range"),
        (infer, {"inputs": [{**image, "data": [10**400] * 3072}]}, 400, "huge integers"),
        (infer, {"inputs": [{**image, "data": [[[[[[[[[0.0]]]]]]]]]}]}, 400, "levels deep"),
        (infer, {"inputs": [{**image, "parameters": {"binary_data_size": 12288}}]}, 400, "not both"),
        (infer, {"inputs": ["images"]}, 400, "Expected each input to be an object"),
        (infer, {**ok, "outputs": ["logits"]}, 400, "Expected each requested output to be an object"),
        (infer, {**ok, "outputs": [{"name": "logits", "parameters": {"classification": "3"}}]}, 400,
         "'classification' to be an integer"),
        # A boolean or a null among numbers is not a pixel (numpy would read true as 1.0).
        (infer, {"inputs": [{**image, "data": [True] + [10.0] * 3071}]}, 400, "Received: booleans"),
        (infer, {"inputs": [{**image, "datatype": "UINT8", "data": [None] + [10] * 3071}]}, 400, "Received: nulls"),
        # The metadata says [-1, 32, 32, 3]: one image without its batch axis is not this model's input.
        (infer, {"inputs": [{**image, "shape": [32, 32, 3]}]}, 400, "expected shape [-1, 32, 32, 3]"),
        (infer, {"inputs": [{**image, "data": [0.5] * 3072}]}, 400, "pixels scaled to 0-1?"),
        # An unhashable datatype was a 500; a lone surrogate quoted in the error a plain-text 500.
        (infer, {"inputs": [{**image, "datatype": []}]}, 400, "Unsupported datatype '[]'"),
        (infer, {"inputs": [{**image, "shape": "\ud800"}]}, 400, "Received: '\\ud800'"),
        (infer, {**ok, "outputs": [{"name": "logits"}, {"name": "logits"}]}, 400, "'logits' is requested twice"),
        # Brackets in a string are no nesting: a valid request with such an id is served.
        (infer, {**ok, "id": "[[[[[[[[[["}, 200, None),
        # More images than /config's max_batch_size (8 here): refused as Triton refuses it (it was served).
        (infer, {"inputs": [{**image, "shape": [9, 32, 32, 3], "data": [0.0] * 9 * 3072}]}, 400,
         "inference request batch-size must be <= 8 for 'vit-cifar100'"),
        (infer, {"inputs": [{**image, "shape": [8, 32, 32, 3], "data": [0.0] * 8 * 3072}]}, 200, None),
        (infer, {"inputs": [{**image, "datatype": "UINT32", "data": [0] * 3072}]}, 200, None),
        # A size that is not an integer is said to be one (it read "'24576' does not match ... 24576 bytes").
        (infer, {"inputs": [{**no_data, "parameters": {"binary_data_size": "12288"}}]}, 400,
         'binary_data_size to be an integer number of bytes. Received: "12288"'),
        (infer, {"inputs": [{**no_data, "parameters": {"binary_data_size": None}}]}, 400, "Received: null"),
    ]  # fmt: skip
    for url, doc, code, message in cases:
        response = httpx.post(url, content=json.dumps(doc).encode())  # ASCII: a lone surrogate escaped
        assert response.status_code == code, (url, response.text)
        assert message is None or message in response.json()["error"] and "\n" not in response.json()["error"]
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 100}}]}).encode()  # fmt: skip
    response = httpx.post(f"{base}/vit-cifar100/infer", content=header + b"\0" * 100,
                          headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert response.status_code == 400 and "binary_data_size 100 does not match" in response.json()["error"]
    assert httpx.post(f"{base}/vit-cifar100/infer", content=b"{nope").status_code == 400
    for length in ("\u00b2", "1\u00b9", "-1", "x"):  # superscript digits pass str.isdigit()
        response = httpx.post(infer, content=header + b"\0" * 100,
                              headers={"Inference-Header-Content-Length": length.encode("latin-1")})  # fmt: skip
        assert response.status_code == 400 and "does not fit" in response.json()["error"], response.text
    # Lengths of thousands of digits (int() refuses past 4,300): a client's error, never a 500.
    body = json.dumps(ok).encode()
    for length, code in (("9" * 5000, 400), ("0" * 4990 + str(len(body)), 200)):
        response = httpx.post(infer, content=body, headers={"Inference-Header-Content-Length": length})
        assert response.status_code == code, response.text
    # Binary tensors without their header's length: said so (it read only "not UTF-8 text").
    raw = np.full((1, 32, 32, 3), 200, np.float32).tobytes()
    response = httpx.post(infer, content=header + raw)
    assert (
        response.status_code == 400
        and "needs the Inference-Header-Content-Length" in response.json()["error"]
    )
    utf16 = json.dumps(ok).encode("utf-16")
    response = httpx.post(infer, content=utf16)
    assert response.status_code == 400 and "not UTF-8" in response.json()["error"]
    response = httpx.post(infer, content=json.dumps(ok).encode(), headers={"Content-Encoding": "br"})
    assert response.status_code == 415 and "'br' is not supported" in response.json()["error"]

    # Errors outside the served routes are the protocol's too, and an encoded '/' addresses nothing.
    def not_found() -> float:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
        return sum(
            float(x.split()[-1]) for x in lines if x.startswith('vit_consumer_requests_total{code="404"}')
        )

    before = not_found()
    for method, url, code in [("GET", f"{base}/vit-cifar100/stats", 404), ("GET", f"{base}", 404),
                              ("POST", f"{base}/vit-cifar100/ready", 405),
                              ("POST", f"{base}/vit-cifar100%2Fversions%2F1/infer", 404),
                              ("GET", f"{base}/vit-cifar100%2Fready", 404)]:  # fmt: skip
        response = httpx.request(method, url, json=ok)
        assert response.status_code == code and "error" in response.json(), (url, response.text)
    assert not_found() == before + 1  # the one inference request among them, counted as /predict's are
    # A trailing slash (the protocol's description writes /v2/) is the same endpoint, not a 307 to follow.
    server = httpx.get(f"http://127.0.0.1:{port}/v2/")
    assert server.status_code == 200 and "model_configuration" in server.json()["extensions"], server.text
    assert httpx.get(f"{base}/vit-cifar100/versions/1/").status_code == 200
    assert httpx.post(f"{infer}//", json=ok).status_code == 200
