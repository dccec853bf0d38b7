"""The consumer as an inference server: real uvicorn processes on free loopback ports.

Dynamic batching (asserted on the batch-size metric, results equal to unbatched
inference), 503 on a full queue, 504 on timeouts, health, metrics, OpenAPI, each
hardening rule, bounded memory under concurrent large requests, and champion
reload against a real ``mlflow server``.
"""

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import constant_classifier, free_port, stop, wait_for_http

pytestmark = pytest.mark.integration


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _serve(model: str, env: dict, *options: str, tracking_uri: str | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "vit_consumer", "--model", model]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port), *options], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health/ready", proc, timeout=120)
    return proc, url


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.split()[-1])
    return 0.0


def _reloads_reach(url: str, result: str, count: float, why: str, timeout: float = 60.0) -> None:
    """Waits until ``vit_consumer_reloads_total{result=...}`` reaches ``count``; fails with ``why`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while _metric(url, "vit_consumer_reloads_total", f'{{result="{result}"}}') < count:
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


@pytest.fixture(scope="module")
def batching_server(tiny_export, no_tf_env):
    _, path, _ = tiny_export
    proc, url = _serve(str(path), no_tf_env, "--max-batch-size", "16", "--max-queue-delay-ms", "30")
    yield url
    stop(proc)


def test_concurrent_requests_share_batches_and_get_their_own_rows(batching_server, tiny_export, real_cut):
    from vit_consumer import OnnxClassifier

    _, path, _ = tiny_export
    images = real_cut[2][:48]
    bodies = [_jpeg(im) for im in images]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{batching_server}/predict?top_k=3", content=b,
                                                     headers={"Content-Type": "image/jpeg"}, timeout=60), bodies))  # fmt: skip
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    # The same images one by one, unbatched, in this process.
    clf = OnnxClassifier(path, ["CPUExecutionProvider"])
    for body, answer in zip(bodies, answers, strict=True):
        (expected,) = clf.predict(clf.decode_image(body)[None], 3)
        got = answer.json()["predictions"][0]
        assert [p["index"] for p in got] == [p["index"] for p in expected]
        np.testing.assert_allclose(
            [p["probability"] for p in got], [p["probability"] for p in expected], atol=1e-5
        )
    batches = _metric(batching_server, "vit_consumer_batches_total")
    images_run = _metric(batching_server, "vit_consumer_inferences_total")
    singles = _metric(batching_server, "vit_consumer_batch_size_bucket", '{le="1.0"}')
    assert images_run >= 48 and batches < images_run and singles < batches  # batches of more than one image
    # One compute time per session.run:
    assert _metric(batching_server, "vit_consumer_compute_seconds_count") == batches
    assert _metric(batching_server, "vit_consumer_compute_seconds_sum") > 0
    assert _metric(batching_server, "vit_consumer_requests_total", '{code="200"}') >= 48


def test_health_metrics_and_openapi(batching_server):
    assert httpx.get(f"{batching_server}/health/live").json() == {"status": "live"}
    assert httpx.get(f"{batching_server}/health/ready").status_code == 200
    health = httpx.get(f"{batching_server}/health").json()
    assert health["status"] == "ok" and health["input"]["shape"] == ["batch", 32, 32, 3]
    text = httpx.get(f"{batching_server}/metrics").text
    for name in ("vit_consumer_request_latency_seconds_bucket", "vit_consumer_queue_wait_seconds_bucket",
                 "vit_consumer_decode_seconds_bucket", "vit_consumer_compute_seconds_bucket",
                 "vit_consumer_batch_size_bucket", "vit_consumer_model_info", "vit_consumer_ready 1.0"):  # fmt: skip
        assert name in text, name
    spec = httpx.get(f"{batching_server}/openapi.json").json()["paths"]["/predict"]["post"]
    from vit_consumer import contract

    # Every Content-Type the service reads, and no other (the OpenAPI description is what a client generator sees).
    assert set(spec["requestBody"]["content"]) == {*contract.IMAGE_MEDIA_TYPES, "application/octet-stream", "multipart/form-data",
                                                   "application/json", "application/x-npy"}  # fmt: skip
    assert {"image/png", "image/jpeg", "image/webp"} <= set(spec["requestBody"]["content"])
    assert "predictions" in json.dumps(spec["responses"]["200"]) or spec["responses"]["200"]["content"]
    assert {"400", "413", "415", "503", "504"} <= set(spec["responses"])


def test_full_queue_gets_503_with_retry_after(tiny_export, no_tf_env):
    _, path, _ = tiny_export
    proc, url = _serve(str(path), no_tf_env, "--max-queue", "1", "--max-batch-size", "1")
    try:
        body = _npy(np.zeros((512, 32, 32, 3), np.uint8))  # each request is a long session.run
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/predict", content=body, timeout=120,
                                                         headers={"Content-Type": "application/x-npy"}), range(12)))  # fmt: skip
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 503 in codes, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and busy.json()["detail"].startswith("Busy")
        assert httpx.get(f"{url}/health/live").status_code == 200  # still up
    finally:
        stop(proc)


def test_request_timeout_gets_504(tiny_export, no_tf_env):
    _, path, _ = tiny_export
    proc, url = _serve(str(path), no_tf_env, "--timeout", "0.001")
    try:
        resp = httpx.post(f"{url}/predict", content=_npy(np.zeros((256, 32, 32, 3), np.uint8)),
                          headers={"Content-Type": "application/x-npy"}, timeout=60)  # fmt: skip
        assert resp.status_code == 504 and "Not answered within" in resp.json()["detail"]
        assert _metric(url, "vit_consumer_requests_total", '{code="504"}') == 1
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def strict_server(tiny_export, no_tf_env):
    _, path, _ = tiny_export
    proc, url = _serve(str(path), no_tf_env, "--pixel-budget", "1000000", "--max-bytes", "3000000",
                       "--max-inflight-bytes", "6000000", "--body-timeout", "5")  # fmt: skip
    yield url
    stop(proc)


def _declared_png(width: int, height: int) -> bytes:
    """A small PNG file whose header declares ``width`` x ``height`` (a decompression bomb's first bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _npy_header(shape: tuple, dtype: str = "<f8") -> bytes:
    """A .npy file's header declaring ``shape``, followed by a few bytes only."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def _npy_raw(header: dict, data_bytes: int) -> bytes:
    """A .npy file with ``header`` as written (numpy would refuse to write some) and ``data_bytes`` zero bytes."""
    import struct

    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + b"\0" * data_bytes


def _damaged_png() -> bytes:
    """A PNG whose second data chunk has a broken type (CRC right): Pillow's decoder raises SyntaxError."""
    import struct
    import zlib

    png = _png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    i = png.find(b"IDAT")
    n = struct.unpack(">I", png[i - 4 : i])[0]
    data = png[i + 4 : i + 4 + n]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    return png[: i - 4] + chunk(b"IDAT", data[:100]) + chunk(b"ID\x00T", data[100:]) + png[i + 8 + n :]


def _then_health(port: int, request: bytes) -> bytes:
    """Everything the service answers on one connection to ``request`` followed by ``GET /health/live`` (whose
    200 says the connection was kept after the first answer)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request + b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = b""
        while part := sock.recv(65536):
            answers += part
    return answers


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_deeply_nested_json_is_a_400_and_the_connection_survives(strict_server):
    with httpx.Client(base_url=strict_server, timeout=30) as client:  # one keep-alive connection
        deep = b"[" * 100_000 + b"]" * 100_000
        resp = client.post("/predict", content=deep, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and "nested 100000 levels deep" in resp.json()["detail"]
        ok = client.post("/predict", content=_png(np.zeros((32, 32, 3), np.uint8)),
                         headers={"Content-Type": "image/png"})  # fmt: skip
        assert ok.status_code == 200


def test_pixel_budget_counts_all_images_of_a_request(strict_server):
    big = _png(np.zeros((800, 800, 3), np.uint8))  # 0.64 MP each; the budget is 1 MP
    one = json.dumps({"images_b64": [base64.b64encode(big).decode()]}).encode()
    two = json.dumps({"images_b64": [base64.b64encode(big).decode()] * 2}).encode()
    assert httpx.post(f"{strict_server}/predict", content=one, headers={"Content-Type": "application/json"},
                      timeout=30).status_code == 200  # fmt: skip
    resp = httpx.post(
        f"{strict_server}/predict", content=two, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert resp.status_code == 413 and "more than 1000000 pixels together" in resp.json()["detail"]
    # Refused once the whole body was read: the connection stays for the next request (a refusal before the
    # body is read closes it).

    port = int(strict_server.rsplit(":", 1)[1])
    answers = _then_health(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(two)}\r\n\r\n".encode() + two)  # fmt: skip
    assert answers.startswith(b"HTTP/1.1 413 ") and b"HTTP/1.1 200 " in answers, answers[:400]


@pytest.mark.parametrize(
    ("body", "content_type", "query", "status", "message"),
    [
        (b"[" * 9 + b"]" * 9, "application/json", "", 400, "nested 9 levels deep"),
        (b"[" + b"0," * 1_200_000 + b"0]", "application/json", "", 413, "values; at most"),
        (json.dumps({"images_b64": ["@@not base64@@"]}).encode(), "application/json", "", 400, "base64"),
        (json.dumps({"instances": [[1, 2], [3]]}).encode(), "application/json", "", 400, "equal-length rows"),
        (json.dumps({"other": 1}).encode(), "application/json", "", 400, "Expected JSON"),
        (b"GIF89a" + b"\0" * 20, "image/png", "", 400, "Could not decode"),
        (b"x", "image/png", "?top_k=abc", 400, "top_k"),
        (b"x", "image/png", "?top_k=0", 400, "top_k"),
        (b"x", "image/png", "?top_k=", 400, "top_k"),
        (b"x", "image/png", "?top_k=3&top_k=", 400, "top_k"),
        (b"x", "image/png", "?top_k=%C2%B2", 400, "top_k"),
        (b"x" * 3_000_001, "image/png", "", 413, "exceeds the limit"),
        (b"x", "text/html", "", 415, "Unsupported Content-Type"),
        (b'{"instances": [' + b"9" * 400 + b"]}", "application/json", "", 400, "huge integers"),
        (json.dumps({"instances": [[["1"] * 3] * 32] * 32}).encode(), "application/json", "", 400, "strings"),
        (_npy_header((10**12, 32, 32, 3)), "application/x-npy", "", 400, "header declares"),
        (_npy(np.zeros((0, 32, 32, 3), np.uint8)), "application/x-npy", "", 400, "Expected 1 to 1024 images"),
        (_damaged_png(), "image/png", "", 400, "Could not decode the image"),  # Pillow raises SyntaxError
        (
            _npy_raw({"descr": "|u1", "fortran_order": False, "shape": (-1, 32, 32, -3)}, 3072),
            "application/x-npy",
            "",
            400,
            "Not a readable .npy array",
        ),
        (
            _npy_raw({"descr": [("a", "<f4", (3,))], "fortran_order": False, "shape": (1, 32, 32)}, 12288),
            "application/x-npy",
            "",
            400,
            "Expected numeric pixel values",
        ),
        (
            _npy_raw({"descr": ("<f4", (3,)), "fortran_order": False, "shape": (1, 32, 32)}, 12288),
            "application/x-npy",
            "",
            400,
            "Not a readable .npy array",
        ),
        (
            _npy(np.zeros((1, 32, 32, 3), "m8[s]")),
            "application/x-npy",
            "",
            400,
            "Expected numeric pixel values",
        ),
        (
            json.dumps({"instances": [[[True, 1, 2]] * 32] * 32}).encode(),
            "application/json",
            "",
            400,
            "booleans",
        ),
        (json.dumps({"instances": None}).encode(), "application/json", "", 400, "Received: nulls"),
        (
            json.dumps({"instances": [[[0] * 3] * 32] * 32, "images_b64": []}).encode(),
            "application/json",
            "",
            400,
            "not both",
        ),
        (b"--x\r\n", "multipart/form-data", "", 400, "without a boundary"),
        (
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
            "multipart/form-data; boundary=x",
            "",
            400,
            "holds no file part",
        ),
        (b"not multipart at all", "multipart/form-data; boundary=x", "", 400, "multipart/form-data"),
        (
            b"--" + b"x" * 300 + b"\r\n",
            "multipart/form-data; boundary=" + "x" * 300,
            "",
            400,
            "Boundary length",
        ),
        # Cut short before the closing boundary: finalize() accepts it, and the last file would go unanswered.
        (
            b'--x\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            + _png(np.zeros((32, 32, 3), np.uint8))
            + b"\r\n",
            "multipart/form-data; boundary=x",
            "",
            400,
            "ends before its closing boundary",
        ),
        (_declared_png(30000, 30000), "image/png", "", 413, "more than 1000000 pixels"),
        (_declared_png(1200, 1000), "image/png", "", 413, "more than 1000000 pixels"),
    ],
)
def test_each_malformed_request_gets_a_4xx_with_one_plain_line(strict_server, body, content_type, query, status,
                                                                 message):  # fmt: skip
    resp = httpx.post(f"{strict_server}/predict{query}", content=body, headers={"Content-Type": content_type},
                      timeout=60)  # fmt: skip
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert message in detail and "\n" not in detail
    assert " at 0x" not in detail and "object>" not in detail  # no Python object reprs
    assert httpx.get(f"{strict_server}/health/live").status_code == 200


def test_every_way_a_client_sends_an_image_gets_the_same_answer(strict_server, real_cut):
    """The formats training reads from folders (WebP, GIF, BMP, TIFF, PNM, TGA), application/octet-stream, base64
    as browsers and command-line tools write it, and a phone's rotated JPEG with a mistyped EXIF tag."""
    image = real_cut[2][0]  # a real CIFAR-100 test image, 32 x 32 RGB

    def answer(body: bytes, content_type: str) -> list:
        resp = httpx.post(f"{strict_server}/predict", content=body, headers={"Content-Type": content_type},
                          timeout=60)  # fmt: skip
        assert resp.status_code == 200, (content_type, resp.text)
        return resp.json()["predictions"]

    def encoded(fmt: str, **options) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, **options)
        return buf.getvalue()

    png = _png(image)
    expected = answer(png, "image/png")
    for fmt, content_type, options in [("WEBP", "image/webp", {"lossless": True}), ("BMP", "image/bmp", {}),
                                       ("TIFF", "image/tiff", {}), ("PPM", "image/x-portable-pixmap", {}),
                                       ("TGA", "image/x-tga", {}), ("PNG", "application/octet-stream", {})]:  # fmt: skip
        assert answer(encoded(fmt, **options), content_type) == expected, fmt
    assert answer(_npy(image[None]), "application/octet-stream") == expected
    # A form's file fields (requests' and httpx's files=, curl -F, a browser): one image each, text fields ignored.
    resp = httpx.post(f"{strict_server}/predict", files=[("file", ("a.png", png, "image/png")),
                                                         ("other", ("b.webp", encoded("WEBP", lossless=True)))],
                      data={"note": "text fields are not images"}, timeout=60)  # fmt: skip
    assert resp.status_code == 200 and resp.json()["predictions"] == expected * 2, resp.text
    # A browser's optional file input left empty sends a part with filename="" and no bytes: not an image.
    resp = httpx.post(f"{strict_server}/predict", files=[("file", ("a.png", png, "image/png")),
                                                         ("optional", ("", b"", "application/octet-stream"))],
                      timeout=60)  # fmt: skip
    assert resp.status_code == 200 and resp.json()["predictions"] == expected, resp.text
    gif = answer(encoded("GIF"), "image/gif")  # a 256-colour palette: close, not equal
    assert len(gif) == 1 and len(gif[0]) == 5
    b64 = base64.b64encode(png).decode()
    for text in (f"data:image/png;base64,{b64}", f"data:application/octet-stream;base64,{b64}",
                 base64.encodebytes(png).decode(),
                 base64.urlsafe_b64encode(png).decode().rstrip("=")):  # fmt: skip
        doc = json.dumps({"images_b64": [text]}).encode()
        assert answer(doc, "application/json") == expected
    # EXIF orientation 6 (stored sideways) with a SHORT tag stored as ASCII: Pillow's exif_transpose fails to
    # write that EXIF back; the service turns the image upright and answers as for the upright image.
    import struct

    entries = [(0x112, 3, 1, struct.pack("<H", 6)), (0x14C, 2, 4, b"abc\0")]
    exif = b"II*\0" + struct.pack("<IH", 8, len(entries))
    exif += b"".join(struct.pack("<HHI", t, ty, c) + v.ljust(4, b"\0") for t, ty, c, v in entries) + b"\0" * 4
    sideways = np.ascontiguousarray(np.rot90(image, 1))  # what a camera stores for orientation 6
    buf = io.BytesIO()
    Image.fromarray(sideways).save(buf, format="PNG", exif=b"Exif\0\0" + exif)
    assert answer(buf.getvalue(), "image/png") == expected


def test_a_content_length_of_thousands_of_digits_is_a_client_error(strict_server):
    """uvicorn lets a zero-padded Content-Length through; int() refuses strings over 4,300 digits."""
    import socket

    host, port = strict_server.removeprefix("http://").split(":")
    body = _png(np.zeros((32, 32, 3), np.uint8))
    for length, code in (("0" * 4990 + str(len(body)), b"200"), ("9" * 5000, b"400")):  # the latter: uvicorn
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode() + body)  # fmt: skip
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.split(b" ", 2)[1] == code, reply[:300]


def test_compressed_bodies_are_inflated_within_the_limits(strict_server):
    import gzip
    import zlib

    image = _png(np.zeros((32, 32, 3), np.uint8))
    for encoding, packed in (("gzip", gzip.compress(image)), ("deflate", zlib.compress(image))):
        resp = httpx.post(f"{strict_server}/predict", content=packed,
                          headers={"Content-Type": "image/png", "Content-Encoding": encoding})  # fmt: skip
        assert resp.status_code == 200, resp.text
    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB of zeros in about 50 kB; the limit is 3 MB
    resp = httpx.post(f"{strict_server}/predict", content=bomb,
                      headers={"Content-Type": "application/x-npy", "Content-Encoding": "gzip"})  # fmt: skip
    assert resp.status_code == 413 and "once decompressed" in resp.json()["detail"]
    resp = httpx.post(f"{strict_server}/predict", content=gzip.compress(image)[:-9],
                      headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})  # fmt: skip
    assert resp.status_code == 400 and "truncated" in resp.json()["detail"]


def test_a_body_refused_once_read_whole_keeps_the_connection(strict_server):
    """An unknown encoding (415), a body that does not inflate (400) or an empty body (400) has been read to its
    end: the next request on the connection is answered (they were refused with ``Connection: close``)."""

    port = int(strict_server.rsplit(":", 1)[1])
    png = _png(np.zeros((32, 32, 3), np.uint8))
    import gzip

    bomb = gzip.compress(b"\0" * 50_000_000)  # over the 3 MB limit once inflated
    cases = (("br", png, b"415"), ("gzip", png, b"400"), ("identity", b"", b"400"), ("gzip", bomb, b"413"))
    for encoding, body, status in cases:
        answers = _then_health(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                               + f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                               + body)  # fmt: skip
        first = answers.split(b"\r\n\r\n", 1)[0].lower()
        assert first.startswith(b"http/1.1 " + status) and b"connection: close" not in first, answers[:400]
        assert b"HTTP/1.1 200 " in answers, (encoding, answers[:400])


def test_stalled_uploads_neither_lock_others_out_nor_stay(strict_server, tiny_export):
    """Clients that declare large bodies and stop sending (a slowloris) hold only what they sent, and get
    a 408 once the body's deadline (5 s here) has passed; everyone else is served meanwhile."""
    import socket

    port = int(strict_server.rsplit(":", 1)[1])
    stalled = []
    for _ in range(2):  # 2 x 3,000,000 declared bytes: the whole in-flight budget
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 3000000\r\n\r\n\x89PNG")  # fmt: skip
        stalled.append(sock)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        ok = httpx.post(f"{strict_server}/predict", content=_png(np.zeros((32, 32, 3), np.uint8)),
                        headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert time.monotonic() - started < 4  # not after the stalled ones are timed out
        for sock in stalled:
            answer = sock.recv(4096)
            assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 408 Request Timeout", answer
            assert b"connection: close" in answer.lower()
        # And the connection closes (it stayed open, reading what a client trickled, for ever).
        sock = stalled[0]
        sock.settimeout(0.5)
        deadline, closed = time.monotonic() + 4, False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"\0")
                closed = sock.recv(4096) == b""
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed
    finally:
        for sock in stalled:
            sock.close()
    assert _metric(strict_server, "vit_consumer_requests_total", '{code="408"}') >= 2


def test_a_body_larger_than_the_whole_in_flight_budget_is_a_413_not_a_503_to_retry():
    from vit_consumer.classifier import InputError
    from vit_consumer.server import QueueFull, _Admission, _Booking

    admission = _Admission(100)
    with pytest.raises(InputError, match="in-flight budget of 100 bytes") as refused:
        _Booking(admission).take(101)
    assert refused.value.status == 413 and admission.used == 0
    first = _Booking(admission)
    first.take(60)
    with pytest.raises(QueueFull):  # busy now: a retry can succeed
        _Booking(admission).take(60)
    first.release()
    assert admission.used == 0


def test_a_client_gone_mid_body_is_a_499_and_the_service_keeps_serving(strict_server):
    import socket

    def count(code: str) -> float:
        return _metric(strict_server, "vit_consumer_requests_total", f'{{code="{code}"}}')

    before_499, before_500 = count("499"), count("500")
    port = int(strict_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 10)  # fmt: skip
    deadline = time.monotonic() + 10
    while count("499") == before_499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count("499") == before_499 + 1 and count("500") == before_500  # client closed request, no 500
    ok = httpx.post(f"{strict_server}/predict", content=_png(np.zeros((32, 32, 3), np.uint8)),
                    headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
    assert ok.status_code == 200 and httpx.get(f"{strict_server}/health/live").status_code == 200


def test_the_lean_path_sees_predict_under_a_root_path():
    from vit_consumer.server import _route_path

    assert _route_path({"path": "/predict", "root_path": ""}) == "/predict"
    assert (
        _route_path({"path": "/api/predict", "root_path": "/api"}) == "/predict"
    )  # uvicorn --root-path /api
    assert _route_path({"path": "/api", "root_path": "/api"}) == "/"
    assert _route_path({"path": "/other/predict", "root_path": "/api"}) == "/other/predict"


def test_get_on_predict_is_405_and_openapi_keeps_documenting_it(strict_server):
    # POST /predict is served by a lean ASGI path (server.PredictPath); everything else stays FastAPI's.
    assert httpx.get(f"{strict_server}/predict").status_code == 405
    assert "post" in httpx.get(f"{strict_server}/openapi.json").json()["paths"]["/predict"]


def test_load_benchmark_rounds_side_by_side(tmp_path, no_tf_env, real_cut):
    from pathlib import Path

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(real_cut[2][:12]):
        (folder / f"{i}.jpg").write_bytes(_jpeg(image))
    model = constant_classifier(tmp_path / "constant.onnx", 100, favoured=7)
    out = tmp_path / "bench.json"
    bench = Path(__file__).resolve().parents[2] / "deploy" / "consumer" / "bench.py"
    done = subprocess.run([sys.executable, str(bench), "--model", str(model), "--images", str(folder),
                           "--clients", "3,1", "--rounds", "2", "--seconds", "0.5", "--engine-seconds", "0.1",
                           "--max-batch-size", "8", "--output", str(out)], env=no_tf_env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["rounds"] == 2 and report["images"] == 12
    assert [e["batch"] for e in report["engine"]] == [1, 8]
    for engine in report["engine"]:
        assert len(engine["per_round"]) == 2 and engine["calls"] == sum(
            r["calls"] for r in engine["per_round"]
        )
    # Both protocols at each client level: JPEG files to /predict, binary tensors to the v2 infer.
    assert [(level["protocol"], level["clients"]) for level in report["service"]] == [
        ("predict", 3), ("predict", 1), ("v2", 3), ("v2", 1)]  # fmt: skip
    for level in report["service"]:
        assert (
            level["errors"] == 0 and level["requests"] == sum(r["requests"] for r in level["per_round"]) > 0
        )
        assert level["p50_ms"] <= level["p90_ms"] <= level["p99_ms"] and level["mean_batch_size"] >= 1
    assert len(report["decode_ms_per_round"]) == 2 and report["decode_ms"] > 0
    assert set(report["engine_b1_p50_ms_by_spin"]) == {"always", "run", "never"}
    # The engine alone is the one the service said it serves with.
    assert report["served"]["engine"] == "onnxruntime" and report["served"]["file"] == str(model)
    e1, eb = report["engine"]
    for i, protocol in enumerate(("predict", "v2")):
        lines = report["ratios"][4 * i : 4 * i + 4]
        assert all(line.startswith(f"{protocol}: ") for line in lines)
        assert "Little's law" in lines[1] and lines[2].startswith(f"{protocol}: p50 at 1 client")
        # The target figures, recomputed from the rows: the most clients for speed, one client for the p50 gap.
        top, one = report["service"][2 * i : 2 * i + 2]
        speed = [
            s["req_per_s"] / e["images_per_s"] for s, e in zip(top["per_round"], eb["per_round"], strict=True)
        ]
        assert f"per round {', '.join(f'{v:.2f}' for v in speed)} " in lines[0]
        decodes = report["decode_ms_per_round"] if protocol == "predict" else [0.0, 0.0]  # v2: pixels already
        gaps = [s["p50_ms"] - e["p50_ms"] - d
                for s, e, d in zip(one["per_round"], e1["per_round"], decodes, strict=True)]  # fmt: skip
        assert f"per round {', '.join(f'{g:+.2f}' for g in gaps)} " in lines[2]
        assert f": {3 / eb['images_per_s'] * 1e3:.0f} ms" in lines[1]
        # The lone request's time, split by the service's own histograms: the parts fit inside the handler.
        parts = one["service_ms_per_request"]
        assert parts["decode"] > 0  # a JPEG's decoding, or a binary tensor's parsing and checks
        assert parts["decode"] + one["compute_ms_per_batch"] <= parts["handler"] <= one["client_mean_ms"]
        assert lines[3].startswith(f"{protocol}: at 1 client, means:")
    assert "| 3 |" in done.stdout and "2 rounds side by side" in done.stdout


def test_memory_stays_bounded_under_16_clients_with_the_largest_requests(tiny_export, no_tf_env):
    """16 clients send the largest allowed requests at once; the service's RSS stays within its budget.

    Budget: request bodies in flight (``--max-inflight-bytes``) plus, per decode
    thread (2), a decoded image budget in RGB, its resized copy and the model
    input; plus 64 MiB for buffers the allocator keeps. Measured: peak RSS minus
    the RSS after warm-up.
    """
    import psutil

    _, path, _ = tiny_export
    max_bytes, inflight, pixels = 2 * 2**20, 8 * 2**20, 1_500_000
    proc, url = _serve(str(path), no_tf_env, "--max-bytes", str(max_bytes), "--max-inflight-bytes", str(inflight),
                       "--pixel-budget", str(pixels))  # fmt: skip
    try:
        rng = np.random.default_rng(0)
        noise = _jpeg(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8), quality=70)  # 1.44 MP
        assert len(noise) < max_bytes
        service = psutil.Process(proc.pid)
        httpx.post(f"{url}/predict", content=noise, headers={"Content-Type": "image/jpeg"}, timeout=60)
        base = service.memory_info().rss
        peak, done = [base], threading.Event()

        def sample():
            while not done.is_set():
                peak.append(service.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()

        def client(_):
            codes = []
            with httpx.Client(timeout=120) as c:
                for _ in range(6):
                    codes.append(c.post(f"{url}/predict", content=noise,
                                        headers={"Content-Type": "image/jpeg"}).status_code)  # fmt: skip
            return codes

        with ThreadPoolExecutor(16) as pool:
            codes = [c for cs in pool.map(client, range(16)) for c in cs]
        done.set()
        sampler.join()
        assert set(codes) <= {200, 503} and codes.count(200) >= 16, codes
        budget = inflight + 2 * pixels * (3 + 3 + 4) + 64 * 2**20
        growth = max(peak) - base
        print(
            f"peak RSS growth {growth / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB, {codes.count(503)} x 503"
        )
        assert growth < budget
    finally:
        stop(proc)


# ---- champion reload against a real mlflow server ----


def test_reload_follows_the_champion_and_refuses_a_broken_version(
    tiny_export, no_tf_env, tmp_path, mlflow_server, real_cut
):
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    _, path, _ = tiny_export
    uri = mlflow_server
    from vit_consumer.mlflow_store import store_uris

    consumer = None
    client = MlflowClient(uri)
    try:
        exp = client.create_experiment("serving")

        def register(onnx_path) -> str:
            run = client.create_run(exp)
            with store_uris(uri):  # mlflow.onnx.log_model writes through the process-wide store
                info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="m", registered_model_name="served",
                                             run_id=run.info.run_id, save_as_external_data=False)  # fmt: skip
            return str(info.registered_model_version)

        client.set_registered_model_alias("served", "champion", register(path))
        consumer, url = _serve(
            "models:/served@champion", no_tf_env, "--reload-seconds", "0.3", tracking_uri=uri
        )
        assert httpx.get(f"{url}/health").json()["version"] == "1"
        favoured = 42
        names = list(real_cut[4])  # the served version's classes: the contract a client holds
        v2 = register(constant_classifier(tmp_path / "const.onnx", 100, favoured, names))
        image = _jpeg(np.zeros((32, 32, 3), np.uint8))
        answers, stop_load = [], threading.Event()

        def load():  # requests keep coming while the alias moves
            with httpx.Client(timeout=60) as c:
                while not stop_load.is_set():
                    answers.append(
                        c.post(f"{url}/predict", content=image, headers={"Content-Type": "image/jpeg"})
                    )

        loader = threading.Thread(target=load)
        loader.start()
        client.set_registered_model_alias("served", "champion", v2)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").json()["version"] != v2:
            assert time.monotonic() < deadline, "the service never switched to v2"
            time.sleep(0.1)
        time.sleep(0.3)
        stop_load.set()
        loader.join()
        assert answers and all(a.status_code == 200 for a in answers)
        versions = [a.json()["version"] for a in answers]
        assert set(versions) == {"1", "2"} or versions[-1] == "2"
        for a in answers:  # each answer comes from the model of the version it names
            if a.json()["version"] == "2":
                assert a.json()["predictions"][0][0]["index"] == favoured
        assert _metric(url, "vit_consumer_reloads_total", '{result="ok"}') == 1
        assert (
            f'vit_consumer_model_info{{source="models:/served@champion",version="{v2}"}} 1.0'
            in httpx.get(f"{url}/metrics").text
        )

        # A broken version: registered, made champion, never served.
        run = client.create_run(exp)
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(b"not an onnx file")
        client.log_artifacts(run.info.run_id, str(broken), "broken")
        v3 = client.create_model_version("served", f"runs:/{run.info.run_id}/broken", run.info.run_id).version
        client.set_registered_model_alias("served", "champion", str(v3))
        _reloads_reach(url, "failed", 1, "the broken version was never tried")
        assert httpx.get(f"{url}/health").json()["version"] == v2
        ok = httpx.post(f"{url}/predict", content=image, headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["version"] == v2

        # Another contract: two classes swapped (index 3 would now name another class). Refused, and said so.
        swapped = names[:]
        swapped[3], swapped[4] = swapped[4], swapped[3]
        v4 = register(constant_classifier(tmp_path / "swapped.onnx", 100, favoured, swapped))
        client.set_registered_model_alias("served", "champion", v4)
        _reloads_reach(url, "refused", 1, "the version with other classes was never looked at")
        health = httpx.get(f"{url}/health").json()
        assert health["version"] == v2 and health["not_switched"][v4].startswith(
            "its contract differs: class names (the same classes in another order); clients may hold the old one"
        )
    finally:
        if consumer is not None:
            stop(consumer)


def test_a_store_gone_during_a_reload_is_tried_again_and_old_versions_leave_the_disk(
    tiny_export, no_tf_env, tmp_path, mlflow_server, real_cut
):
    """A download cut off by the store (a real dropped connection) once refused the new champion until a
    restart; and each version the service switched to stayed on disk for good."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient
    from vit_consumer.mlflow_store import store_uris

    from tests.conftest import FaultyProxy

    _, path, _ = tiny_export
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("reload-outage")

    def register(onnx_path) -> str:
        run = client.create_run(exp)
        with store_uris(mlflow_server):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="m", registered_model_name="outage",
                                         run_id=run.info.run_id, save_as_external_data=False)  # fmt: skip
        return str(info.registered_model_version)

    client.set_registered_model_alias("outage", "champion", register(path))
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    proxy, consumer = FaultyProxy(mlflow_server), None
    try:
        consumer, url = _serve("models:/outage@champion", {**no_tf_env, "TMPDIR": str(downloads),
                                                           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                               "--reload-seconds", "0.3", tracking_uri=proxy.url)  # fmt: skip
        assert len(list(downloads.glob("vit-consumer-model-*"))) == 1
        v2 = register(constant_classifier(tmp_path / "const.onnx", 100, 7, list(real_cut[4])))
        proxy.drop = lambda request: "/mlflow-artifacts/" in request  # the store goes away mid-download
        client.set_registered_model_alias("outage", "champion", v2)
        _reloads_reach(url, "check_failed", 2, "the new champion was not tried again")
        health = httpx.get(f"{url}/health").json()
        assert health["version"] == "1" and v2 not in health.get("not_switched", {})
        assert _metric(url, "vit_consumer_reloads_total", '{result="failed"}') == 0 and proxy.failed >= 2
        # Gone in the middle of the file (MLflow gathers the failure into a message without its cause).
        proxy.drop, proxy.truncate = None, lambda request: "/mlflow-artifacts/" in request
        failed_before = _metric(url, "vit_consumer_reloads_total", '{result="check_failed"}')
        _reloads_reach(url, "check_failed", failed_before + 2, "a download cut short was not tried again")
        assert _metric(url, "vit_consumer_reloads_total", '{result="failed"}') == 0
        assert httpx.get(f"{url}/health").json()["version"] == "1"
        proxy.truncate = None  # back: the next check serves it
        _reloads_reach(url, "ok", 1, "the service never switched once the store was back")
        assert httpx.get(f"{url}/health").json()["version"] == v2
        assert len(list(downloads.glob("vit-consumer-model-*"))) == 1  # v1's files are gone, v2's kept
    finally:
        if consumer is not None:
            stop(consumer)
        proxy.close()
    assert not list(downloads.glob("vit-consumer-model-*"))  # and none after a clean stop


def test_vit_pipeline_serve_is_the_consumer_with_its_options(tiny_export):
    """``vit-pipeline serve`` from the pipeline's install: the consumer's own options pass through."""
    from pathlib import Path

    _, path, _ = tiny_export
    port = free_port()
    cli = Path(sys.executable).parent / "vit-pipeline"
    # --engine is a global option of the consumer (before its subcommand): it was refused here.
    proc = subprocess.Popen([str(cli), "serve", "--model", str(path), "--port", str(port), "--max-batch-size", "4",
                             "--no-choose", "--engine", "openvino"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health/ready", proc, timeout=120)
        health = httpx.get(f"{url}/health").json()
        assert health["file"] == Path(path).name and health["candidate"]["served"] == "registered@openvino"
        assert health["engine"] == "openvino", health["engine"]
        image = np.zeros((32, 32, 3), np.uint8)
        answer = httpx.post(f"{url}/predict", content=_jpeg(image), headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200 and answer.json()["predictions"][0]
    finally:
        stop(proc)
    bad = subprocess.run([str(cli), "serve", "--model", str(path)], env={**os.environ,
                         "VIT_MAX_BATCH_SIZE": "zero"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("Error: Invalid settings")
    assert "Traceback" not in bad.stderr
    for port in ("99999", "-1", "0"):  # refused before the model loads (99999 listened on a wrapped port)
        bad = subprocess.run([str(cli), "serve", "--model", str(path), "--port", port], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert bad.returncode == 2 and "expected a port from 1 to 65535" in bad.stderr, bad.stderr[-500:]


def test_vit_pipeline_serve_moves_every_global_option_of_the_consumer_before_its_subcommand():
    import argparse
    from pathlib import Path

    from vit_consumer.__main__ import GLOBAL_OPTIONS, _parser

    from vit_pipeline.cli import _split_consumer_args

    parser = _parser()
    globals_ = {o for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
                for o in a.option_strings if o not in ("-h", "--help")}  # fmt: skip
    assert globals_ == set(GLOBAL_OPTIONS)
    assert _split_consumer_args(["--port", "1", "--engine=openvino", "--model", "m.onnx", "--spin"]) == (
        ["--engine=openvino", "--model", "m.onnx"],
        ["--port", "1", "--spin"],
    )
    help_ = subprocess.run([str(Path(sys.executable).parent / "vit-pipeline"), "serve", "--help"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert help_.returncode == 0 and "--engine" in help_.stdout and "--max-batch-size" in help_.stdout


def test_contract_change_names_what_a_client_would_find_changed():
    from types import SimpleNamespace

    from vit_consumer.server import contract_change

    old = SimpleNamespace(class_names=["cat", "dog", "eel"], input_shape=(32, 32, 3))
    assert (
        contract_change(old, SimpleNamespace(class_names=["cat", "dog", "eel"], input_shape=(32, 32, 3)))
        == ""
    )
    assert contract_change(
        old, SimpleNamespace(class_names=["dog", "cat", "eel"], input_shape=(32, 32, 3))
    ) == ("class names (the same classes in another order)")
    assert contract_change(old, SimpleNamespace(class_names=["cat", "dog"], input_shape=(64, 64, 3))) == (
        "class names (3 -> 2 classes, 0 new names); input shape [32, 32, 3] -> [64, 64, 3]"
    )
    assert contract_change(
        old, SimpleNamespace(class_names=["cat", "dog", "fox"], input_shape=(32, 32, 3))
    ) == ("class names (3 -> 3 classes, 1 new names)")


def test_a_hangup_runs_what_is_registered_before_and_after_it_once():
    """A client that left between its body and the registration was computed and counted as a 200."""
    from vit_consumer.http import Hangup

    calls = []
    hangup = Hangup()
    hangup.on(lambda: calls.append("before"))
    hangup.fire()
    hangup.fire()
    hangup.on(lambda: calls.append("after"))
    assert calls == ["before", "after"]
