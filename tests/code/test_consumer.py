"""The ONNX consumer runs in processes where TensorFlow cannot be imported."""

import io
import json
import pickle
import re
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from tests.conftest import constant_classifier, free_port, stop, wait_for_http
from vit_pipeline.evaluate import predict_logits

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tiny_export, no_tf_env):
    _, path, _ = tiny_export
    port = free_port()
    cmd = [sys.executable, "-m", "vit_consumer", "--model", str(path), "serve", "--port", str(port),
           "--max-bytes", "300000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=no_tf_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc)
        yield url
    finally:
        stop(proc)


def _post(url, body: bytes, content_type: str):
    import httpx

    return httpx.post(f"{url}/predict", content=body, headers={"Content-Type": content_type}, timeout=30)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_health_reports_contract_and_real_providers(server):
    import httpx

    doc = httpx.get(f"{server}/health").json()
    assert doc["status"] == "ok" and doc["num_classes"] == 100
    assert doc["input"]["shape"] == ["batch", 32, 32, 3]
    assert doc["providers"] == ["CPUExecutionProvider"]  # what the session runs on, here
    assert doc["mlflow_run_id"] == "r123"
    # HEAD on every GET path (uptime monitors, curl -I): the GET's status and headers, no body. Was 405.
    name = (
        httpx.post(f"{server}/v2/models/unknown/infer", json={})
        .json()["error"]
        .split("serves ")[1]
        .strip("'")
    )
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/v2", "/v2/health/live",
                 "/v2/health/ready", f"/v2/models/{name}", f"/v2/models/{name}/ready"):  # fmt: skip
        head, get = httpx.head(f"{server}{path}"), httpx.get(f"{server}{path}")
        assert head.status_code == get.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    # One operation per path and method in the OpenAPI document (HEAD routes of their own duplicated the ids).
    ids = [
        op["operationId"]
        for ops in httpx.get(f"{server}/openapi.json").json()["paths"].values()
        for op in ops.values()
    ]
    assert len(ids) == len(set(ids)), sorted(ids)


def test_classifies_real_images_like_keras(server, tiny_export, real_cut):
    model, _, _ = tiny_export
    images, names = real_cut[2][:64], real_cut[4]
    keras_top1 = predict_logits(model, images).argmax(axis=1)
    # A batch of raw arrays.
    resp = _post(server, _npy(images), "application/x-npy")  # uint8 is accepted too
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert [p[0]["index"] for p in preds] == keras_top1.tolist()
    assert preds[0][0]["label"] == names[keras_top1[0]] and len(preds[0]) == 5
    probs = [p["probability"] for p in preds[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    # PNG files one at a time, and base64 JSON.
    for i in range(8):
        resp = _post(server, _png(images[i]), "image/png")
        assert resp.json()["predictions"][0][0]["index"] == keras_top1[i]
    import base64

    body = json.dumps({"images_b64": [base64.b64encode(_png(im)).decode() for im in images[:3]]}).encode()
    resp = _post(server, body, "application/json")
    assert [p[0]["index"] for p in resp.json()["predictions"]] == keras_top1[:3].tolist()
    body = json.dumps({"instances": images[:2].tolist()}).encode()
    assert [
        p[0]["index"] for p in _post(server, body, "application/json").json()["predictions"]
    ] == keras_top1[:2].tolist()


def test_other_image_sizes_and_modes_are_converted(server):
    big_gray = np.random.default_rng(0).integers(0, 256, (100, 80), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big_gray).save(buf, format="JPEG")
    resp = _post(server, buf.getvalue(), "image/jpeg")
    assert resp.status_code == 200 and len(resp.json()["predictions"]) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (
            _npy(np.zeros((2, 16, 16, 3), np.float32)),
            "application/x-npy",
            400,
            "Expected shape [batch, 32, 32, 3]",
        ),
        (json.dumps({"instances": [["a", "b"]]}).encode(), "application/json", 400, "numeric"),
        (
            json.dumps({"instances": (np.ones((1, 32, 32, 3)) * 300).tolist()}).encode(),
            "application/json",
            400,
            "[0, 255]",
        ),  # fmt: skip
        (b"\x89PNG\r\n\x1a\n this is not a png", "image/png", 400, "Could not decode the image"),
        (b"{not json", "application/json", 400, "Invalid JSON"),
        (pickle.dumps(np.zeros((1, 32, 32, 3), dtype=object)), "application/x-npy", 400, "npy"),
        (b"hello", "text/plain", 415, "Unsupported Content-Type"),
        (b"\0" * 400_000, "application/x-npy", 413, "exceeds the limit"),
        (b"", "image/png", 400, "Empty request body"),
    ],
)
def test_bad_input_gets_4xx_with_a_clear_message(server, body, content_type, status, message):
    resp = _post(server, body, content_type)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]


def test_pixels_scaled_to_0_1_are_refused_not_read_as_a_black_image(server, real_cut):
    """Floats in 0-1 are the usual convention elsewhere; read as 0-255 they got a confident wrong class."""
    images = real_cut[0][:2].astype(np.float32)
    scaled = images.copy()
    scaled[1] /= 255.0
    for body, kind in ((json.dumps({"instances": scaled.tolist()}).encode(), "application/json"),
                       (_npy(scaled), "application/x-npy")):  # fmt: skip
        resp = _post(server, body, kind)
        assert resp.status_code == 400, resp.text
        assert (
            "image 1 has fractional values no higher than 1 (pixels scaled to 0-1?)" in resp.json()["detail"]
        )
    # What 0-255 allows stays allowed: a near-black image of whole numbers, fractions above 1.
    for fine in (np.ones_like(images) * (np.arange(3072).reshape(32, 32, 3) % 2), images * 0.9 + 0.5):
        assert _post(server, _npy(fine), "application/x-npy").status_code == 200


def _raw(url: str, chunks: list[bytes], wait: float = 0.0) -> bytes:
    """Sends ``chunks`` on one connection (stopping where the service hangs up), waits, returns what came back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(wait)
        out = b""
        try:
            while part := sock.recv(65536):
                out += part
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def test_the_request_head_is_bounded_in_size_and_time_and_upgrade_offers_are_ignored(server):
    """uvicorn's httptools protocol buffered a 200 MB header, held half-sent heads for ever and dropped the
    body of a request offering Upgrade: h2c (curl --http2, Java's HttpClient): vit_consumer.http."""
    from vit_consumer.http import HEAD_TIMEOUT_S, MAX_HEAD_BYTES

    big = [b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * 16384] * (
        MAX_HEAD_BYTES // 16384 + 4
    )
    assert _raw(server, big).startswith(b"HTTP/1.1 431 ")
    start = time.perf_counter()
    slow = _raw(server, [b"POST /predict HTTP/1.1\r\nHost: x\r\n"])  # and nothing more
    assert (
        slow.startswith(b"HTTP/1.1 408 ")
        and HEAD_TIMEOUT_S - 1 < time.perf_counter() - start < HEAD_TIMEOUT_S + 5
    )
    assert requests_ok(server)  # the service is as it was
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    head = (f"POST /predict?top_k=1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            f"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(png.getvalue())}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    for chunks in ([head + png.getvalue()], [head, png.getvalue()]):
        answer = _raw(server, chunks, wait=0.3)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in answer, answer[:300]
    # Pipelined behind a request still being answered: both answers, in order (top_k 2, then top_k 1).
    first = (f"POST /predict?top_k=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
             f"Content-Length: {len(png.getvalue())}\r\n\r\n").encode() + png.getvalue()  # fmt: skip
    answer = _raw(server, [first + head + png.getvalue()], wait=0.5)
    parts = answer.split(b"HTTP/1.1 200 ")[1:]
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in parts]
    assert [len(b["predictions"][0]) for b in bodies] == [2, 1], answer[:600]
    # A head that arrives in one read is measured too (it completed before it was counted: 200 up to 128 KiB),
    # and the bounds hold on the connection after an offer (h11 took it over: a 200 KB head was served).
    one_read = (
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1000) + b"\r\n\r\n"
    )
    assert _raw(server, [one_read]).startswith(b"HTTP/1.1 431 ")
    kept_alive = head.replace(b"Connection: close\r\n", b"")
    answer = _raw(server, [kept_alive + png.getvalue() + one_read], wait=0.5)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 431 ") == 1, answer[:600]
    # Offers pipelined in one read are each parsed again in a loop (600 overflowed the recursion: no answer);
    # a malformed request behind an answer is refused after it; CONNECT is no offer.
    offer = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    answer = _raw(
        server, [offer * 1000 + b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    )
    assert answer.count(b"HTTP/1.1 200 ") == 1001, answer[:300]
    answer = _raw(server, [b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP\r\n\r\n"], wait=0.3)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 400 ") == 1, answer[:600]
    answer = _raw(server, [b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 405 ") and b"allow: GET, HEAD, POST" in answer, answer[:300]


def requests_ok(url: str) -> bool:
    import httpx

    return httpx.get(f"{url}/health/live", timeout=10).status_code == 200


def _metric(url: str, line_start: str) -> float:
    import httpx

    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(line_start))


def _slow_classifier(path, num_classes: int = 10, width: int = 512):
    """A real ONNX classifier of the contract that takes milliseconds per image (a (width x width) @
    (width x width) product per image, 2 MB of weights): time for clients to leave while it works."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w0": rng.normal(size=(3072, width)) / 50, "w1": rng.normal(size=(width, width)) / 50,
               "w2": rng.normal(size=(width, num_classes)), "shape": np.array([-1, width, 1])}  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w0"], ["h"]),
            helper.make_node("Reshape", ["h", "shape"], ["column"]),
            helper.make_node("Mul", ["column", "h_row"], ["square"]),  # (b, width, 1) * (b, 1, width)
            helper.make_node("Unsqueeze", ["h", "axis1"], ["h_row"]),
            helper.make_node("MatMul", ["square", "w1"], ["mixed"]),
            helper.make_node("ReduceMean", ["mixed"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w2"], ["logits"]),
        ],
        "slow",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        [
            numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
            for k, v in weights.items()
        ]
        + [numpy_helper.from_array(np.array([1], np.int64), "axis1")],
    )
    graph.node.sort(
        key=lambda n: ["flat", "h", "h_row", "column", "square", "mixed", "pooled", "logits"].index(
            n.output[0]
        )
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.helper.set_model_props(model, {"class_names": json.dumps([f"class{i}" for i in range(num_classes)])})
    onnx.save(model, str(path))
    return path


def test_a_client_that_hangs_up_before_its_answer_is_not_computed_and_counts_as_499(tmp_path, no_tf_env):
    """Clients that time out and go away (then retry) had their images computed and counted as 200s."""
    port = free_port()
    cmd = [sys.executable, "-m", "vit_consumer", "--model", str(_slow_classifier(tmp_path / "slow.onnx")), "serve",
           "--port", str(port), "--no-choose"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=no_tf_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{server}/health", proc)
        _hang_up_and_count(server, port)
    finally:
        stop(proc)


IMAGES_PER_REQUEST = 10  # 400 images at about 2 ms each


def _hang_up_and_count(server: str, port: int) -> None:
    host = "127.0.0.1"
    body = _npy(np.full((IMAGES_PER_REQUEST, 32, 32, 3), 7, np.uint8))
    request = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
    ok, gone, images = (
        (_metric(server, f'vit_consumer_requests_total{{code="{c}"}}') for c in ("200", "499")),
        None,
        0,
    )
    ok, gone = list(ok)
    images = _metric(server, "vit_consumer_inferences_total")
    clients = [socket.create_connection((host, int(port))) for _ in range(40)]
    for sock in clients:
        sock.sendall(request)
    time.sleep(0.2)  # every body read and queued; the batcher is working through them
    for sock in clients:
        sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answered = _metric(server, 'vit_consumer_requests_total{code="200"}') - ok
        left = _metric(server, 'vit_consumer_requests_total{code="499"}') - gone
        if answered + left >= 40:
            break
        time.sleep(0.2)
    assert answered + left == 40 and left >= 1, (answered, left)
    time.sleep(1.0)  # a dropped request's batch already running finishes; nothing else may start
    computed = _metric(server, "vit_consumer_inferences_total") - images
    # The answered requests' images, and at most the batch running when the others left (32 images).
    assert computed <= IMAGES_PER_REQUEST * answered + 32, (computed, answered)
    assert computed < 40 * IMAGES_PER_REQUEST, computed


def test_sigterm_stops_within_the_grace_period_whatever_a_client_holds(tiny_export, no_tf_env):
    """A stalled upload kept a SIGTERMed service for its 30 s body timeout: Kubernetes' whole grace period."""
    import signal

    from vit_consumer.__main__ import GRACEFUL_SHUTDOWN_S

    port = free_port()
    cmd = [sys.executable, "-m", "vit_consumer", "--model", str(tiny_export[1]), "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=no_tf_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            b"Content-Length: 100000\r\n\r\n" + b"\x89PNG")  # fmt: skip
            time.sleep(0.5)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=GRACEFUL_SHUTDOWN_S + 15)
            took = time.monotonic() - start
        # uvicorn ends by raising the signal it caught again: the exit status is SIGTERM's.
        assert took < GRACEFUL_SHUTDOWN_S + 5 and proc.returncode in (0, -signal.SIGTERM), (
            took,
            proc.returncode,
        )
    finally:
        stop(proc)


def _predict(server, image: Image.Image, fmt: str = "PNG", **save) -> list[dict]:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    resp = _post(server, buf.getvalue(), f"image/{'png' if fmt == 'PNG' else 'jpeg'}")
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"][0]


def test_images_are_read_as_a_viewer_shows_them(server, real_cut):
    """A 16-bit greyscale PNG is the 8-bit one (not clipped white), an EXIF-rotated image is upright, and a
    camera's JPEG with an MPF segment (Pillow's MPO) is a JPEG."""
    photo = Image.fromarray(real_cut[0][0].astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
    grey = np.asarray(photo.convert("L"), dtype=np.uint16)
    deep = _predict(server, Image.fromarray(grey * 257))  # 16 bits: I;16
    assert deep == _predict(server, Image.fromarray(grey.astype(np.uint8)))
    assert deep != _predict(server, Image.fromarray(np.full((64, 64), 255, np.uint8)))  # what clipping gave
    sideways = photo.transpose(Image.Transpose.ROTATE_90)  # stored as a phone does; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = _predict(server, photo)
    assert _predict(server, sideways, exif=exif.tobytes()) == upright
    assert _predict(server, sideways) != upright  # the tag made the difference
    mpo = _predict(server, photo, "MPO", save_all=True, append_images=[photo], quality=95)
    assert mpo == _predict(server, photo, "JPEG", quality=95)


def test_a_format_the_data_stage_does_not_read_is_refused(server):
    """PCX: Pillow reads it, but neither an image folder (by suffix) nor the service (``contract.IMAGE_FORMATS``)
    takes it; the service does not even try its decoder."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PCX")
    resp = _post(server, buf.getvalue(), "image/png")
    assert resp.status_code == 400 and "not an image file of a format read here" in resp.json()["detail"]


def test_champion_from_a_real_mlflow_server(tiny_export, no_tf_env, real_cut, tmp_path, mlflow_server):
    """Register through HTTP, then the TF-free consumer fetches models:/...@champion."""
    from vit_pipeline.config import make_config
    from vit_pipeline.registry import TestSplit, register_onnx
    from vit_pipeline.runs import create_run

    model, path, _ = tiny_export
    uri = mlflow_server
    cfg = make_config("cifar100", {"tracking_uri": uri, "registered_model_name": "consumer-champion"})
    run_id = create_run(cfg, "test")
    split = TestSplit(real_cut[2][:64], real_cut[3][:64], list(real_cut[4]), "digest")
    reg = register_onnx(cfg, run_id, str(path), split, keras_test_accuracy=0.42)
    assert reg.promoted
    image = tmp_path / "img.png"
    image.write_bytes(_png(real_cut[2][5]))
    out = subprocess.run(
        [sys.executable, "-m", "vit_consumer", "--model", "models:/consumer-champion@champion",
         "--tracking-uri", uri, "predict", str(image), "--top-k", "3"],
        env=no_tf_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    preds = json.loads(out.stdout.strip().splitlines()[-1])["predictions"]
    assert len(preds) == 3
    assert preds[0]["index"] == int(predict_logits(model, real_cut[2][5:6]).argmax())


def test_consumer_cli_rejects_a_file_that_is_not_onnx(no_tf_env, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"definitely not protobuf")
    image = tmp_path / "x.png"
    image.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    out = subprocess.run(
        [sys.executable, "-m", "vit_consumer", "--model", str(fake), "predict", str(image)],
        env=no_tf_env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and out.stderr.startswith("Error: Not a loadable ONNX model")


def test_an_address_it_cannot_listen_on_is_one_line_before_the_model_loads(no_tf_env, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not read: the address is checked first")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for host, message in (("no-such-host.invalid", "Name or service not known"), ("127.0.0.1", "in use")):
            out = subprocess.run([sys.executable, "-m", "vit_consumer", "--model", str(fake), "serve", "--host", host,
                                  "--port", port], env=no_tf_env, capture_output=True, text=True, timeout=60)  # fmt: skip
            assert out.returncode == 1, out.stderr[-500:]
            assert out.stderr.startswith(f"Error: Cannot listen on {host}:{port}: ") and message in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1


def test_a_bad_serve_setting_is_one_line_before_the_model_loads(no_tf_env, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not read: the settings are checked first")
    for option, value, field in (("--body-timeout", "inf", "body_timeout_s"), ("--timeout", "1e999", "timeout_s"),
                                 ("--max-queue", "0", "max_queue")):  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "vit_consumer", "--model", str(fake), "serve", "--port", "18779",
                              option, value], env=no_tf_env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 1, out.stderr[-500:]
        assert (
            out.stderr.startswith(f"Error: Invalid settings: {field}=") and len(out.stderr.splitlines()) == 1
        )
    # A provider name ONNX Runtime does not know (a typo) was dropped with a warning and served on CPU.
    for command in (["serve", "--port", "18779"], ["predict", str(fake)]):
        out = subprocess.run([sys.executable, "-m", "vit_consumer", "--model", str(fake), "--providers",
                              "CUDAExecutionProvder", *command], env=no_tf_env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1, out.stderr[-500:]
        assert out.stderr.startswith(
            "Error: Invalid settings: providers='CUDAExecutionProvder': unknown ONNX"
        )


def test_a_tracking_server_that_is_down_is_one_line_in_seconds(no_tf_env, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{free.getsockname()[1]}"  # nothing listens there once closed
    image = tmp_path / "x.png"
    image.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    cmd = [sys.executable, "-m", "vit_consumer", "--model", "models:/vit@champion", "--tracking-uri", uri,
           "predict"]  # fmt: skip
    started = time.monotonic()
    out = subprocess.run([*cmd, str(image)], env=no_tf_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-500:]
    assert out.stderr.startswith(f"Error: Could not read models:/vit@champion: the MLflow tracking server {uri} "
                                 "does not answer (")  # fmt: skip
    assert time.monotonic() - started < 30  # MLflow's own retries took minutes
    # A mistyped image path is said before the model is fetched (it waited for the download, or the timeout).
    out = subprocess.run([*cmd, str(image), "nope.png"], env=no_tf_env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 1 and out.stderr == "Error: Image file does not exist: nope.png\n", out.stderr[
        -500:
    ]


def test_vit_pipeline_predict_command(tiny_export, real_cut, tmp_path):
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    model, path, _ = tiny_export
    image = tmp_path / "img.png"
    image.write_bytes(_png(real_cut[2][9]))
    result = CliRunner().invoke(main, ["predict", str(image), "--model", str(path), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output.strip().splitlines()[-1])
    assert doc["predictions"][0]["index"] == int(predict_logits(model, real_cut[2][9:10]).argmax())
    missing = CliRunner().invoke(main, ["predict", str(tmp_path / "nope.png"), "--model", str(path)])
    assert missing.exit_code == 1 and "Image file does not exist" in missing.output


def test_photos_of_any_size_training_reads_are_read_by_predict_and_a_larger_budget(tiny_export, tmp_path):
    """predict refused a 24 MP photo (a service's 16 MP request budget) that training read; a service's larger
    --pixel-budget still stopped at 80 MP, and each call set Pillow's process-wide limit to its budget."""
    from click.testing import CliRunner
    from PIL import Image
    from vit_consumer import InputError, OnnxClassifier

    from vit_pipeline.cli import main

    _, path, _ = tiny_export
    photo = tmp_path / "photo.png"
    Image.new("RGB", (6000, 4000), (200, 120, 40)).save(photo)  # 24 MP
    result = CliRunner().invoke(main, ["predict", str(photo), "--model", str(path)])
    assert result.exit_code == 0, result.output
    clf = OnnxClassifier(str(path))
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match="more than 1000000 pixels"):
        clf.decode_images([photo.read_bytes()], 1_000_000)
    assert limit == Image.MAX_IMAGE_PIXELS
    large = tmp_path / "large.png"
    Image.new("RGB", (7000, 6000), (10, 20, 30)).save(large)  # 42 MP
    with (
        warnings.catch_warnings()
    ):  # Pillow warned past the last budget set (40 MP) and refused past twice it
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert clf.decode_images([large.read_bytes()], 50_000_000).shape[0] == 1
    consumer = subprocess.run([sys.executable, "-m", "vit_consumer", "--model", str(path), "predict", str(photo)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert consumer.returncode == 0 and json.loads(consumer.stdout)["predictions"], consumer.stderr[-500:]


def test_registered_candidates_are_timed_here_and_the_fastest_serves(
    tiny_export, no_tf_env, real_cut, tmp_path, mlflow_server
):
    """The export's candidates travel inside the model version; the consumer times them at start-up."""
    import httpx
    from mlflow import MlflowClient

    from vit_pipeline.config import make_config
    from vit_pipeline.registry import TestSplit, register_onnx
    from vit_pipeline.runs import create_run
    from vit_pipeline.variants import build_variants

    _, path, _ = tiny_export
    built = build_variants(path, tmp_path, ["optimized", "int8-static"], calibration=real_cut[0][:64])
    manifest = tmp_path / "candidates.json"
    from vit_consumer import OnnxClassifier

    from vit_pipeline.export import write_serving_gate

    gate_images = real_cut[2][:32]
    gate = write_serving_gate(tmp_path, gate_images, OnnxClassifier(path).run(gate_images.astype(np.float32)))
    manifest.write_text(json.dumps({"served_variant": "optimized", "min_agreement": 0.995, "candidates": {
        "int8-static": {"file": built["int8-static"].name, "top1_agreement": 0.999, "test_accuracy": 0.4}},
        "gate": gate}))  # fmt: skip
    cfg = make_config(
        "cifar100", {"tracking_uri": mlflow_server, "registered_model_name": "consumer-candidates"}
    )
    run_id = create_run(cfg, "test")
    split = TestSplit(real_cut[2][:64], real_cut[3][:64], list(real_cut[4]), "digest")
    reg = register_onnx(cfg, run_id, str(built["optimized"]), split, candidates=str(manifest))
    version = MlflowClient(mlflow_server).get_model_version("consumer-candidates", reg.version)
    assert version.tags["candidates"] == "int8-static"
    assert version.tags["candidate.int8-static.top1_agreement"] == "0.999000"
    assert version.tags["serving_gate_images"] == "32"

    port = free_port()
    cmd = [sys.executable, "-m", "vit_consumer", "--model", "models:/consumer-candidates@champion",
           "--tracking-uri", mlflow_server, "serve", "--port", str(port), "--max-batch-size", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=no_tf_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health/ready", proc, timeout=120)
        doc = httpx.get(f"http://127.0.0.1:{port}/health").json()
    finally:
        stop(proc)
    choice = doc["candidate"]
    scores = choice["scores_ips_geomean"]
    # The registered gate ran again here, on every candidate: each is timed or refused with its figure.
    gated = {"int8-static", "registered@openvino", "registered@openvino-f32", "int8-static@openvino"}
    assert set(choice["gate_agreement"]) <= gated and "int8-static" in choice["gate_agreement"]
    assert set(scores) | set(choice["refused"]) >= {"registered", *choice["gate_agreement"]} - {"registered"}
    assert "registered" in scores and choice["batch_sizes"] == [1, 4]
    assert choice["served"] == max(scores, key=scores.get)
    file_of = {"registered": "model.onnx", "int8-static": built["int8-static"].name}
    assert doc["file"] == file_of[choice["served"].split("@")[0]]
    assert doc["engine"] == ("openvino" if "@openvino" in choice["served"] else "onnxruntime")
    assert doc["version"] == reg.version


def test_spin_modes_set_onnx_runtime_waiting_and_refuse_others(tiny_export, real_cut):
    from vit_consumer import OnnxClassifier
    from vit_consumer.classifier import InputError, spin_options

    assert spin_options("run") == {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
    assert spin_options("never")["session.intra_op.allow_spinning"] == "0"
    assert spin_options("always") == {
        "session.intra_op.allow_spinning": "1",
        "session.force_spinning_stop": "0",
    }
    with pytest.raises(
        InputError, match="Expected spin to be one of never, run, always. Received: spin='often'"
    ):
        spin_options("often")
    _, path, _ = tiny_export
    images = real_cut[2][:4].astype(np.float32)
    logits = [
        OnnxClassifier(path, ["CPUExecutionProvider"], spin=mode).run(images) for mode in ("never", "run")
    ]
    np.testing.assert_array_equal(logits[0], logits[1])  # how threads wait never changes the answer


def test_a_candidate_reports_its_own_test_accuracy_not_the_exports(tmp_path):
    """A candidate file's metadata carries the export's (Keras) accuracy; /health must say the candidate's own,
    which the export's gate measured and the manifest holds."""
    from vit_consumer.candidates import candidate_pool
    from vit_consumer.classifier import OnnxClassifier
    from vit_consumer.contract import CandidatesManifest

    registered = constant_classifier(tmp_path / "model.onnx", 3, 1)
    (tmp_path / "extra_files").mkdir()
    constant_classifier(tmp_path / "extra_files" / "model.int8-static.onnx", 3, 1)
    CandidatesManifest("optimized", 0.995, {"int8-static": {"file": "model.int8-static.onnx", "test_accuracy": 0.4,
                                                            "top1_agreement": 0.999}}).write(tmp_path / "extra_files")  # fmt: skip

    def load(file, setting, name):
        clf = OnnxClassifier(file)
        clf.metadata = {**clf.metadata, "test_accuracy": "0.900000"}  # as the export writes it: Keras's
        return clf

    loaded, _ = candidate_pool(registered, "registered", [("onnxruntime", "default")], False, load)
    assert loaded["int8-static"].describe()["test_accuracy"] == "0.400000"


def _not_a_classifier(path, kind: str):
    """ONNX files with class_names metadata that break the contract as users' files do."""
    import onnx
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    if kind == "two inputs":
        nodes = [
            helper.make_node("Add", ["images", "other"], ["sum"]),
            helper.make_node("Flatten", ["sum"], ["logits"]),
        ]
        inputs = [helper.make_tensor_value_info(n, f32, ["batch", 32, 32, 3]) for n in ("images", "other")]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 3072])]
    else:  # the image comes back: 4-D "logits"
        nodes = [helper.make_node("Identity", ["images"], ["logits"])]
        inputs = [helper.make_tensor_value_info("images", f32, ["batch", 32, 32, 3])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 32, 32, 3])]
    model = helper.make_model(helper.make_graph(nodes, "odd", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # fmt: skip
    onnx.helper.set_model_props(model, {"class_names": json.dumps(["a", "b", "c"])})
    onnx.save(model, str(path))
    return path


def test_files_that_break_the_contract_are_refused_in_one_line_by_predict_serve_and_export(tmp_path):
    """A 4-D output, two inputs, logits for 3 classes beside 10 names, class names that are not JSON: predict
    printed tracebacks or labelled 3 logits with 10 names, serve answered every request with a 500, and
    export-serving wrote a Triton config the model does not match."""
    import onnx
    from click.testing import CliRunner
    from vit_consumer import InputError, OnnxClassifier

    from tests.conftest import constant_classifier
    from vit_pipeline.cli import main
    from vit_pipeline.errors import PipelineError
    from vit_pipeline.serving_export import read_model

    image = tmp_path / "img.png"
    image.write_bytes(_png(np.zeros((32, 32, 3), np.uint8)))
    names_off = constant_classifier(tmp_path / "three.onnx", 3, 0, [f"n{i}" for i in range(10)])
    garbled = onnx.load(str(constant_classifier(tmp_path / "garbled.onnx", 3, 0)))
    onnx.helper.set_model_props(garbled, {"class_names": "a, b, c"})
    onnx.save(garbled, str(tmp_path / "garbled.onnx"))
    cases = {
        _not_a_classifier(tmp_path / "image.onnx", "image"): "Expected logits [batch, 3]",
        _not_a_classifier(tmp_path / "two.onnx", "two inputs"): "Expected one input [batch, H, W, 3]",
        names_off: "Expected logits [batch, 10] (one per class name) as the first output. Received: outputs [?, 3]",
        tmp_path / "garbled.onnx": "Expected class_names metadata to be a JSON list of names",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            OnnxClassifier(str(path))
        result = CliRunner().invoke(main, ["predict", str(image), "--model", str(path)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, (
            result.output
        )
        with pytest.raises(PipelineError, match=re.escape(message)):
            read_model(str(path))
