"""HTTP service (FastAPI): dynamic batching, Prometheus metrics, health, champion reload.

Endpoints:

* ``POST /predict?top_k=5``, by ``Content-Type``: ``image/png``, ``image/jpeg``, ``image/webp``...
  (one image file as the body, ``contract.IMAGE_MEDIA_TYPES``; ``application/octet-stream``: an image
  file or a ``.npy`` array, told apart by its bytes); ``application/json`` (``{"instances": [...]}`` raw
  pixels [N, H, W, 3] or [H, W, 3], 0-255, or ``{"images_b64": [...]}``);
  ``application/x-npy`` (loaded with ``allow_pickle=False``). The body is read
  and decoded off the event loop; the images then join the dynamic batcher
  (``vit_consumer.batching``), which runs one ``session.run`` per batch.
* The Open Inference Protocol under ``/v2`` (``vit_consumer.v2``: metadata, ready, config, infer
  with JSON or binary tensors), through the same batcher, limits and metrics.
* ``GET /metrics`` (Prometheus), ``GET /health/live``, ``GET /health/ready``
  (model loaded and warmed up), ``GET /health`` (the model's contract, as before).

Every bad request gets a 4xx with ``{"detail": "<one line>"}`` (under ``/v2``, the
protocol's ``{"error": "<one line>"}``); a request head too large or too slow a 431
or 408 (``vit_consumer.http``); a full queue a 503 with ``Retry-After``; a request
not answered within ``timeout_s`` a 504; a client gone before its answer a 499
(its images leave the queue).
What one request may cost is bounded before the work is done: the body
(``max_bytes``; all bodies being handled together ``max_inflight_bytes``), JSON
nesting depth and number count (checked on the raw bytes before parsing), and
the decoded pixels of all its images together (``pixel_budget``, read from the
image headers before decoding).

Serving ``models:/<name>@<alias>`` with ``reload_seconds > 0``, the service
checks the alias that often; when it moves, the new version is loaded and warmed
up beside the old one, then served; requests already admitted finish on the
version they started with. A version that fails to load or warm up is not
switched to (``vit_consumer_reloads_total{result="failed"}``, and the log), nor one
whose contract differs (``result="refused"``, unless ``allow_contract_change``); a
store that does not answer is tried again at the next check (``result="check_failed"``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gc
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException

from vit_consumer import __version__, contract, limits, v2
from vit_consumer.batching import Arrivals, BatcherStopped, DynamicBatcher, QueueFull
from vit_consumer.classifier import (
    MAX_BATCH,
    InputError,
    OnnxClassifier,
    _plain,
    alias_version,
    registry_target,
)
from vit_consumer.http import ON_GONE, Hangup
from vit_consumer.metrics import Metrics
from vit_consumer.mlflow_store import unavailable as store_unavailable
from vit_consumer.settings import DEFAULT_MAX_BYTES, Settings, SettingsError

log = logging.getLogger("vit_consumer")

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Settings",
    "SettingsError",
    "app_from_env",
    "create_app",
    "settings_from_env",
]


class Prediction(BaseModel):
    index: int
    label: str
    probability: float


class PredictResponse(BaseModel):
    predictions: list[list[Prediction]]
    model: str
    version: str | None
    providers: list[str]


class ErrorResponse(BaseModel):
    detail: str


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "One image file (PNG, JPEG, WebP, GIF, BMP, TIFF, PNM, TGA), a JSON document, or a .npy array "
        "(raw RGB pixels 0-255, NHWC); application/octet-stream: an image file or a .npy array, told apart by "
        "its bytes.",
        "content": {
            **{media_type: IMAGE_BODY for media_type in contract.IMAGE_MEDIA_TYPES},
            "application/octet-stream": IMAGE_BODY,
            "multipart/form-data": {  # a form's file fields, whatever their names: one image each
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/json": {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["instances"],
                            "properties": {
                                "instances": {"type": "array", "description": "[N, H, W, 3] or [H, W, 3]"}
                            },
                        },
                        {
                            "type": "object",
                            "required": ["images_b64"],
                            "properties": {
                                "images_b64": {"type": "array", "items": {"type": "string", "format": "byte"}}
                            },
                        },
                    ]
                }
            },  # fmt: skip
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5},
        }
    ],  # fmt: skip
}
ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad input: shape, dtype, values, undecodable image, invalid or too deeply nested JSON",
        413: "Body, image count or decoded pixels over the limits",
        415: "Unsupported Content-Type or image format",
        503: "Queue full, or model not ready (Retry-After)",
        504: "Not answered within the request timeout",
    }.items()
}


class _Admission:
    """Bytes of all request bodies being handled right now, bounded (memory does not grow with clients)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class _Booking:
    """The bytes one request holds of the in-flight budget: taken as they arrive, given back at its end.

    Booked as received, not as declared: a client that declares a large body and sends a few
    bytes holds a few bytes (it cannot lock others out by declaring), and the body's deadline
    (``body_timeout_s``) ends it.
    """

    def __init__(self, admission: _Admission):
        self.admission, self.held = admission, 0
        self.body_read = False  # the whole body has arrived: a refusal from here on keeps the connection

    def take(self, n: int) -> None:
        if (
            self.held + n > self.admission.limit
        ):  # more than the whole budget: no retry can succeed (not a 503)
            raise InputError(f"Payload exceeds the in-flight budget of {self.admission.limit} bytes "
                              "(--max-inflight-bytes)", 413)  # fmt: skip
        if not self.admission.take(n):
            raise QueueFull(f"{self.admission.used} bytes of requests are being handled")
        self.held += n

    def release(self) -> None:
        self.admission.give(self.held)
        self.held = 0


def parse_body(clf: OnnxClassifier, raw_content_type: str, body: bytes, settings: Settings) -> np.ndarray:
    """Request body -> checked float32 images [N, H, W, 3] (runs in the decode pool).

    Args:
        raw_content_type: The ``Content-Type`` header as sent (a multipart body's boundary is in it).
    """
    # Decoded images need no check_array: the decoder makes them [N, H, W, 3] float32 in 0-255.
    content_type = raw_content_type.split(";")[0].strip().lower()
    if content_type == "multipart/form-data":  # a browser form's or requests' files=: each file part an image
        return clf.decode_images(_multipart_files(raw_content_type, body), settings.pixel_budget)
    if content_type == "application/octet-stream":  # a file sent as bytes: a .npy array or an image
        content_type = "application/x-npy" if body.startswith(NPY_MAGIC) else "image/png"
    if content_type in contract.IMAGE_MEDIA_TYPES:  # the file's own bytes say its format
        return clf.decode_images([body], settings.pixel_budget)
    if content_type == "application/x-npy":
        return clf.check_array(limits.load_npy(body))
    if content_type == "application/json":
        doc = limits.parse_json(body, settings.max_json_depth, settings.max_json_numbers)
        if isinstance(doc, dict) and "instances" in doc and "images_b64" in doc:
            raise InputError('Expected JSON {"instances": [...]} or {"images_b64": [...]}, not both')
        if isinstance(doc, dict) and "instances" in doc:
            return clf.check_array(
                limits.numbers(doc["instances"], "'instances'", booleans=_has_booleans(body))
            )
        if isinstance(doc, dict) and isinstance(doc.get("images_b64"), list) and doc["images_b64"]:
            if len(doc["images_b64"]) > 1024:
                raise InputError(f"Expected 1 to 1024 images. Received: {len(doc['images_b64'])}", 413)
            raw = [_base64_file(s, i, len(doc["images_b64"])) for i, s in enumerate(doc["images_b64"])]
            return clf.decode_images(raw, settings.pixel_budget)
        raise InputError('Expected JSON {"instances": [...]} or {"images_b64": [...]}')
    raise InputError(
        f"Unsupported Content-Type {content_type[:80]!r}; send an image file (image/png, image/jpeg, image/webp, "
        "...), multipart/form-data, application/json, application/x-npy or application/octet-stream",
        415,
    )


def _multipart_files(raw_content_type: str, body: bytes) -> list[bytearray]:
    """The file parts of a ``multipart/form-data`` body (RFC 7578; ``python-multipart``, Starlette's parser), in
    order: the parts with a filename or an ``image/*`` / ``application/octet-stream`` type; text fields are
    ignored (``top_k`` is a query parameter)."""
    from python_multipart.multipart import (
        FormParserError,
        MultipartParser,
        MultipartState,
        parse_options_header,
    )

    boundary = parse_options_header(raw_content_type)[1].get(b"boundary")
    if not boundary:
        raise InputError("multipart/form-data without a boundary parameter")
    files: list[bytearray] = []
    part: dict[str, Any] = {}

    def begin() -> None:
        part.update(headers={}, field=b"", value=b"", data=bytearray())

    def end() -> None:
        disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        kind = part["headers"].get(b"content-type", b"").split(b";")[0].strip().lower()
        named = b"filename" in disposition or b"filename*" in disposition
        if not part["data"]:  # a form's optional file input left empty (filename="", no bytes): no file
            return
        if named or kind.startswith(b"image/") or kind == b"application/octet-stream":
            if len(files) >= MAX_BATCH:
                raise InputError(f"Expected 1 to {MAX_BATCH} images. Received: more", 413)
            files.append(part["data"])

    def header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"] = part["value"] = b""

    callbacks = {
        "on_part_begin": begin,
        "on_part_data": lambda data, start, stop: part["data"].extend(
            memoryview(data)[start:stop]
        ),  # no copy
        "on_part_end": end,
        "on_header_field": lambda data, start, stop: part.update(field=part["field"] + data[start:stop]),
        "on_header_value": lambda data, start, stop: part.update(value=part["value"] + data[start:stop]),
        "on_header_end": header_end,
    }
    try:  # the parser refuses a boundary over 256 bytes when it is made
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:  # MultipartParseError is one
        raise InputError(
            f"Not a readable multipart/form-data body: {str(exc).splitlines()[0][:200]}"
        ) from None
    if parser.state != MultipartState.END:  # finalize() accepts a body cut short: its last file would be lost
        raise InputError("The multipart/form-data body ends before its closing boundary")
    if not files:
        raise InputError("The multipart/form-data body holds no file part (send the image as a file field)")
    return files


def _has_booleans(body: bytes) -> bool:
    """Whether a JSON body may hold a boolean (``limits.numbers`` then looks for one among the numbers)."""
    return b"true" in body or b"false" in body


NPY_MAGIC = b"\x93NUMPY"
_DATA_URI = re.compile(r"\s*data:[^,]*;base64,", re.IGNORECASE)  # any media type: the bytes say the format


def _base64_file(text: object, i: int, n: int) -> bytes:
    """One ``images_b64`` entry as bytes: standard or URL-safe base64, line breaks and a ``data:`` URI prefix
    allowed (what browsers, ``base64`` and ``base64.encodebytes`` write); anything else is refused."""
    where = f" (image {i + 1} of {n})" if n > 1 else ""
    if not isinstance(text, str):
        raise InputError(f"'images_b64' must hold base64 strings{where}")
    prefix = _DATA_URI.match(text)
    text = "".join(text[prefix.end() if prefix else 0 :].split())
    text += "=" * (-len(text) % 4)  # URL-safe base64 often comes unpadded
    try:
        if "-" in text or "_" in text:
            return base64.b64decode(text, altchars=b"-_", validate=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"'images_b64' must hold base64 strings{where}: {exc}") from None


def _top_k(raw: str | None) -> int:
    if raw is None:
        return 5
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise InputError(f"Expected top_k to be an integer from 1 to 1000. Received: top_k={raw[:20]!r}")
    return int(raw)


def _settle(answer: asyncio.Future, done: Future | None, error: BaseException | None) -> None:
    """On the event loop: copies a batcher future's outcome (or a decode ``error``) into ``answer``."""
    if answer.done():
        return
    if error is None and done is not None:
        if done.cancelled():
            answer.cancel()
            return
        error = done.exception()
        if error is None:
            answer.set_result(done.result())
            return
    if isinstance(error, StopIteration):  # an asyncio future refuses StopIteration
        error = RuntimeError(repr(error))
    answer.set_exception(error)


class Service:
    """The app's state: the engine served now, the batcher, metrics, limits, the reload watcher."""

    def __init__(self, classifier: OnnxClassifier, settings: Settings):
        self.engine = classifier
        self.settings = settings
        self.metrics = Metrics()
        # Decoded or being decoded, not yet queued: a batch waits for them (up to the queue delay).
        self.arrivals = Arrivals()
        # As many inference threads as the engine runs requests at once (OpenVINO's streams; else one).
        self.batcher = DynamicBatcher(settings.max_batch_size, settings.max_queue_delay_ms, settings.max_queue,
                                      on_batch=self.metrics.observe_batch, coming=self.arrivals,
                                      workers=classifier.runtime.parallel)  # fmt: skip
        self.arrivals.on_leave = self.batcher.nudge  # one that fails to decode is no longer waited for
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.admission = _Admission(settings.max_inflight_bytes)
        self.ready = False
        self.failed_versions: set[str] = set()
        self.not_switched: dict[str, str] = {}  # version -> why it does not serve (/health)
        self._watch: asyncio.Task | None = None

    def warm(self, clf: OnnxClassifier) -> OnnxClassifier:
        clf.warm_up((1, self.settings.max_batch_size))
        return clf

    @staticmethod
    def freeze_heap() -> None:
        """Puts every object alive now (modules, the engines) out of the garbage collector's reach.

        Why: a full collection walks every tracked object, and the libraries a service loads hold millions;
        at 32 clients on the 2-core machine of deploy/consumer/README.md, full collections of 60-120 ms (with
        the GIL held: every request waits) set the p99 latency. After ``gc.freeze`` they walk only what was
        made since. Run once the model is warm, and again after a reload (the old version's objects are
        unfrozen and collected first, so they are not kept for ever): one pause per reload, not one every
        few seconds.
        """
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    async def start(self) -> None:
        from PIL import Image

        # The pixel budget refuses large images itself (413), before Pillow would decode them: its
        # warning for images above its own limit would only fill the log.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        loop = asyncio.get_running_loop()
        self.batcher.start()
        await loop.run_in_executor(None, self.warm, self.engine)
        await loop.run_in_executor(None, self.freeze_heap)
        self.metrics.serving(self.engine.source, self.engine.version)
        self.ready = True
        self.metrics.ready.set(1)
        if self.settings.reload_seconds > 0 and registry_target(self.engine.source):
            self._watch = loop.create_task(self._watch_alias(), name="champion-reload")

    async def stop(self) -> None:
        self.ready = False  # new requests get a 503
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # Joins the inference thread after its batch: off the event loop, which still answers.
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.discard_files()

    async def _watch_alias(self) -> None:
        loop = asyncio.get_running_loop()
        source = self.engine.source
        while True:
            await asyncio.sleep(self.settings.reload_seconds)
            try:
                version = await loop.run_in_executor(None, alias_version, source, self.settings.tracking_uri)
            except InputError as exc:
                self.metrics.reloads.labels("check_failed").inc()
                log.warning("Could not check %s: %s", source, exc)
                continue
            if version == self.engine.version or version in self.failed_versions:
                continue
            await self._switch(source, version)

    async def _switch(self, source: str, version: str) -> None:
        loop = asyncio.get_running_loop()
        name, _ = registry_target(source)

        def load() -> OnnxClassifier:
            providers = list(self.settings.providers) if self.settings.providers else None
            clf = OnnxClassifier.from_uri(f"models:/{name}/{version}", self.settings.tracking_uri, providers,
                                          spin=self.settings.spin, choose_for=self.settings.choose_for,
                                          engine=self.settings.engine, streams=self.settings.ov_streams)  # fmt: skip
            clf.source, clf.version = source, version
            try:
                return self.warm(clf)
            except BaseException:  # not served: its files go (from_uri removes them on its own failures)
                clf.discard_files()
                raise

        started = time.perf_counter()
        try:
            new = await loop.run_in_executor(None, load)
        except Exception as exc:  # whatever breaks, the old version keeps serving
            if store_unavailable(exc):  # says nothing of the version: tried again at the next check
                self.metrics.reloads.labels("check_failed").inc()
                log.warning("Could not fetch %s v%s (still serving v%s): %s", name, version, self.engine.version,
                            _plain(exc))  # fmt: skip
                return
            self._not_switching(name, version, "failed", _plain(exc))
            return
        change = contract_change(self.engine, new)
        if change and not self.settings.allow_contract_change:
            new.discard_files()
            self._not_switching(name, version, "refused", f"its contract differs: {change}; clients may hold the "
                                "old one: restart the service to serve it, or run it with --allow-contract-change")  # fmt: skip
            return
        old, previous = self.engine.version, self.engine
        # The new version may run on another engine (ONNX Runtime, or OpenVINO with streams): as many
        # inference threads as it runs requests at once.
        self.batcher.set_workers(new.runtime.parallel)
        self.engine = new  # one assignment on the event loop: atomic for every later request
        self.metrics.serving(source, version)
        self.metrics.reloads.labels("ok").inc()
        log.info("Switched %s from v%s to v%s (loaded and warmed in %.1f s)", name, old, version,
                 time.perf_counter() - started)  # fmt: skip
        await loop.run_in_executor(None, previous.discard_files)  # its engines hold what they read
        await loop.run_in_executor(None, self.freeze_heap)

    def _not_switching(self, name: str, version: str, result: str, why: str) -> None:
        """The old version keeps serving: recorded in the metrics, the log and ``/health``, and not tried again."""
        self.failed_versions.add(version)
        self.not_switched[version] = why[:1000]
        self.metrics.reloads.labels(result).inc()
        log.error("Not switching to %s v%s (still serving v%s): %s", name, version, self.engine.version, why)

    async def predict(
        self, top_k_raw: str | None, headers: Mapping[str, str], body: AsyncIterator[bytes],
        on_gone: Hangup | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
        """One ``POST /predict``: (status, JSON document, extra headers), whatever the transport.

        Args:
            top_k_raw: The ``top_k`` query parameter as sent (None: absent).
            headers: Request headers, lower-case names.
            body: The body's chunks as they arrive.
            on_gone: The request's ``vit_consumer.http.Hangup`` (the transport's; None: it cannot tell), where
                what runs if the client hangs up before its answer is registered.
        """
        started = time.perf_counter()
        code, booking = 200, _Booking(self.admission)
        try:
            if not self.ready:
                raise InputError("The model is not ready yet", 503)
            top_k = _top_k(top_k_raw)
            content_type = headers.get("content-type", "")
            data = await self._read_body(headers, body, booking)
            engine = self.engine  # this request finishes on this version, whatever reloads meanwhile
            logits = await asyncio.wait_for(
                self._infer(engine, lambda: parse_body(engine, content_type, data, self.settings), on_gone),
                self.settings.timeout_s,
            )
            return 200, {"predictions": engine.top_k(logits, top_k), "model": engine.source,
                         "version": engine.version, "providers": engine.providers_used}, {}  # fmt: skip
        except InputError as exc:
            code = exc.status
            return code, {"detail": str(exc)}, _error_headers(code, booking.body_read)
        except QueueFull as exc:
            code = 503
            return code, {"detail": f"Busy: {exc}; retry later"}, _error_headers(code, booking.body_read)
        except TimeoutError:
            code = 504
            return code, {"detail": f"Not answered within {self.settings.timeout_s:g} s"}, {}
        except Exception as exc:  # an engine failure: say so in one line, keep serving
            code = 500
            log.exception("Inference failed")
            return code, {"detail": f"Inference failed: {_plain(exc)}"}, {}
        finally:
            booking.release()
            self.metrics.requests.labels(str(code)).inc()
            self.metrics.latency.observe(time.perf_counter() - started)

    async def infer_v2(self, name: str, version: str | None, headers: Mapping[str, str],
                       body: AsyncIterator[bytes], on_gone: Hangup | None = None) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
        """One ``POST /v2/models/{name}[/versions/{v}]/infer``: (status, body, headers); see ``vit_consumer.v2``."""
        started = time.perf_counter()
        code, booking = 200, _Booking(self.admission)
        try:
            if not self.ready:
                raise InputError("The model is not ready yet", 503)
            engine = self.engine
            v2.check_target(engine, name, version)
            data = await self._read_body(headers, body, booking)
            parsed: dict[str, Any] = {}

            def parse() -> np.ndarray:
                images, parsed["doc"], parsed["wanted"] = v2.parse_infer(
                    engine, data, headers.get(v2.HEADER_LENGTH), self.settings.max_json_depth,
                    self.settings.max_json_numbers, self.settings.max_batch_size,
                )  # fmt: skip
                return images

            logits = await asyncio.wait_for(self._infer(engine, parse, on_gone), self.settings.timeout_s)
            out, extra = v2.infer_response(engine, parsed["doc"], logits, parsed["wanted"])
            return 200, out, extra
        except InputError as exc:
            code = exc.status
            return code, _error(str(exc)), _error_headers(code, booking.body_read)
        except QueueFull as exc:
            code = 503
            return code, _error(f"Busy: {exc}; retry later"), _error_headers(code, booking.body_read)
        except TimeoutError:
            code = 504
            return code, _error(f"Not answered within {self.settings.timeout_s:g} s"), {}
        except Exception as exc:  # an engine failure: say so in one line, keep serving
            code = 500
            log.exception("Inference failed")
            return code, _error(f"Inference failed: {_plain(exc)}"), {}
        finally:
            booking.release()
            self.metrics.requests.labels(str(code)).inc()
            self.metrics.latency.observe(time.perf_counter() - started)

    async def _infer(self, engine: OnnxClassifier, parse, on_gone: Hangup | None = None) -> np.ndarray:
        """Parses (``parse()``: checked images) in the decode pool, which queues them for the batcher's
        inference thread; awaits their logits.

        A client that hangs up meanwhile (``on_gone``) ends the wait with a 499 and its images are
        dropped as a timeout's are: not computed if the batcher has not taken them yet.

        Two thread hops, not three: the decode thread queues the images itself and the inference thread's
        answer comes straight back to this request's future (the profile of the service at 32 clients had
        asyncio's future chaining as its largest item on the event loop).
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()
        queued: list[Future] = []
        dropped = threading.Event()  # the request's wait ended (a timeout): do not queue it, or drop it
        leave = self.arrivals.enter()  # on its way until the queue has it, or it fails

        def decode_and_queue() -> None:
            started = time.perf_counter()
            try:
                images = parse()
                self.metrics.decode.observe(time.perf_counter() - started)
                if dropped.is_set():
                    leave()
                    return
                queued.append(self.batcher.put(engine, images, arrived=leave))
            except BaseException as exc:
                leave()
                loop.call_soon_threadsafe(_settle, answer, None, exc)
                return
            finally:
                self.metrics.queue_depth.set(self.batcher.depth())
            if dropped.is_set():  # ended while it was being queued: the batch skips a cancelled future
                queued[0].cancel()
            queued[0].add_done_callback(lambda done: loop.call_soon_threadsafe(_settle, answer, done, None))

        def never_ran(job: Future) -> None:  # cancelled before it started: the service is stopping
            if job.cancelled():
                leave()
                loop.call_soon_threadsafe(_settle, answer, None, BatcherStopped("The service is stopping"))

        gone = []

        def client_gone() -> None:  # on the event loop (the transport's connection_lost)
            if not answer.done():
                gone.append(True)
                answer.set_exception(InputError("The client closed the connection before its answer", 499))

        try:
            running = self.decode_pool.submit(decode_and_queue)
        except RuntimeError as exc:  # the pool is shut down
            leave()
            raise BatcherStopped("The service is stopping") from exc
        running.add_done_callback(never_ran)
        if on_gone is not None:
            on_gone.on(client_gone)  # at once if the client has already left
        try:
            return await answer
        finally:
            # A timeout, or nobody left to answer: drop the work if it has not started.
            if answer.cancelled() or gone:
                dropped.set()
                running.cancel()
                if queued:
                    queued[0].cancel()
            leave()  # every other way out

    async def _read_body(
        self, headers: Mapping[str, str], chunks: AsyncIterator[bytes], booking: _Booking
    ) -> bytes:
        """The request's body within its limits: size (declared, received and decompressed), the in-flight
        budget (``booking``), and the time a client may take to send it (``body_timeout_s``, then 408)."""
        limit = self.settings.max_bytes
        declared = headers.get("content-length")
        if declared is not None and (length := limits.header_int(declared)) is None:
            raise InputError(f"Content-Length {declared[:20]!r} is not a number of bytes")
        if declared is not None and length > limit:
            raise InputError(f"Payload of {declared.strip()[:20]} bytes exceeds the limit of {limit}", 413)

        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):  # no task per request, as wait_for has
                async for chunk in chunks:
                    booking.take(len(chunk))
                    body += chunk
                    if len(body) > limit:
                        raise InputError(f"Payload exceeds the limit of {limit} bytes", 413)
        except TimeoutError:
            raise InputError(f"The request body did not arrive within {self.settings.body_timeout_s:g} s",
                             408) from None  # fmt: skip
        booking.body_read = True  # an empty or undecodable body is refused with the connection kept
        if not body:
            raise InputError("Empty request body")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return bytes(body)
        data = limits.inflate(bytes(body), encoding, limit)
        booking.take(len(data))
        return data


def contract_change(old: OnnxClassifier, new: OnnxClassifier) -> str:
    """What a client of ``old`` would find changed in ``new`` ("": nothing): its classes (an index now naming
    another class answers silently wrong) or its input shape."""
    changes = []
    if new.class_names != old.class_names:
        added = len(set(new.class_names) - set(old.class_names))
        if not added and len(new.class_names) == len(old.class_names):
            changes.append("class names (the same classes in another order)")
        else:
            changes.append(
                f"class names ({len(old.class_names)} -> {len(new.class_names)} classes, {added} new names)"
            )
    if tuple(new.input_shape) != tuple(old.input_shape):
        changes.append(f"input shape {list(old.input_shape)} -> {list(new.input_shape)}")
    return "; ".join(changes)


def _error(message: str) -> bytes:
    """The v2 protocol's error body."""
    return _json_bytes({"error": message})


def _json_bytes(doc: Any) -> bytes:
    """A JSON answer as UTF-8: a lone surrogate a client sent (``"\\ud800"``) and an error quotes stays escaped
    (encoding it raised: a plain-text 500 counted as a 400)."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8", "backslashreplace"
    )


def _error_headers(code: int, body_read: bool) -> dict[str, str]:
    """A refusal's headers: when to retry a 503; a refusal before the whole body was read closes the connection
    (RFC 9110 15.5.9: the rest is not read; kept open, a client could trickle it for ever)."""
    extra = {"Retry-After": "1"} if code == 503 else {}
    return extra if body_read else {**extra, "Connection": "close"}


def request_inputs(scope, receive) -> tuple[str | None, Mapping[str, str], AsyncIterator[bytes]]:
    """What ``Service.predict`` reads from an ASGI request: ``top_k`` as sent, the headers, the body's chunks.

    Starlette's own parsers (the last ``top_k``, blank values kept; the first of
    a repeated header), so both ways in behave alike. A client that goes away
    before its body has arrived is a 499 (nginx's "client closed request").
    """

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InputError("The client closed the connection before sending its body", 499)
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    return QueryParams(scope.get("query_string", b"")).get("top_k"), Headers(scope=scope), chunks()


async def answer(service: Service, scope, receive) -> tuple[int, bytes, dict[str, str]]:
    """One ``POST /predict`` from ASGI in to JSON bytes out: (status, body, extra headers).

    Non-finite numbers (a broken model's logits) are a 500, never invalid JSON.
    """
    code, doc, extra = await service.predict(*request_inputs(scope, receive), on_gone=scope.get(ON_GONE))
    try:
        return code, _json_bytes(doc), extra
    except ValueError:
        return 500, b'{"detail":"Inference failed: the model returned non-finite values"}', extra


class PredictPath:
    """ASGI middleware: ``POST /predict`` goes straight to ``Service.predict``.

    FastAPI's request handling (routing, its middleware stack, the endpoint
    wrapper) costs about as much as decoding a small image, on every request;
    this path skips it. Every other request, and the OpenAPI description of
    ``/predict``, stay FastAPI's.
    """

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        if path.startswith("/v2/") and b"%2f" in scope.get("raw_path", b"").lower():
            # Starlette routes on the decoded path: "vit%2Fversions%2F1" would address version 1.
            started = time.perf_counter()
            await _send(send, 404, _error("Unknown model: a model name or version holds no '/'"), {})
            if scope["method"] == "POST" and path.endswith(
                "/infer"
            ):  # an inference request, counted as all are
                self.service.metrics.requests.labels("404").inc()
                self.service.metrics.latency.observe(time.perf_counter() - started)
            return
        if path.startswith("/v2/") and path.endswith("/"):
            # The protocol's own description writes `/v2/`; Starlette answered a trailing slash with a redirect
            # (307) that clients need not follow. Served as the path without it.
            scope = {**scope, "path": scope["path"].rstrip("/")}
            path = path.rstrip("/")
        if scope["method"] == "HEAD":
            # What uptime monitors, `curl -I` and `wget --spider` send (RFC 9110 section 9.1): the GET's
            # status and headers (the server leaves the body out for HEAD); not a route of its own, whose
            # operation ids would clash with the GET's in the OpenAPI document.
            await self.app({**scope, "method": "GET"}, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        target = v2.match(path) if path.startswith("/v2/") else None
        if path == "/predict":
            code, body, extra = await answer(self.service, scope, receive)
        elif target is not None and target[2] == "infer":
            _, headers, chunks = request_inputs(scope, receive)
            code, body, extra = await self.service.infer_v2(
                target[0], target[1], headers, chunks, scope.get(ON_GONE)
            )
        else:
            await self.app(scope, receive, send)
            return
        await _send(send, code, body, extra)


async def _send(send, code: int, body: bytes, extra: Mapping[str, str]) -> None:
    """One whole response (JSON unless ``extra`` names another content type)."""
    extra = {"content-type": "application/json", **{k.lower(): v for k, v in extra.items()}}
    head = [(b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": code, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _route_path(scope) -> str:
    """The path as the app's routes see it: without the ``root_path`` the server or a mount put in front."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def create_app(classifier: OnnxClassifier, settings: Settings | int | None = None) -> FastAPI:
    """The ASGI app serving ``classifier`` (a plain int is ``max_bytes``, as before)."""
    if isinstance(settings, int):
        settings = Settings(max_bytes=settings)
    service = Service(classifier, settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="vit-consumer", version=__version__, lifespan=lifespan,
                  description="Image classification with a ViT exported by vit-pipeline (ONNX Runtime).")  # fmt: skip
    app.state.service = service

    @app.get("/health")
    def health() -> dict[str, Any]:
        not_switched = {"not_switched": dict(service.not_switched)} if service.not_switched else {}
        return {"status": "ok", **service.engine.describe(), **not_switched}

    @app.get("/health/live")
    def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready", responses={503: {"model": ErrorResponse}})
    def ready() -> Response:
        if not service.ready:
            return JSONResponse({"detail": "loading and warming up the model"}, status_code=503)
        return JSONResponse({"status": "ready", "version": service.engine.version})

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        service.metrics.queue_depth.set(service.batcher.depth())
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_OPENAPI,
              summary="Classify images", description=__doc__.split("Endpoints:")[1].split("* ``GET")[0].strip())  # fmt: skip
    async def predict(request: Request) -> Response:  # documents /predict; PredictPath serves it
        code, body, extra = await answer(service, request.scope, request.receive)
        return Response(body, status_code=code, headers=extra, media_type="application/json")

    _v2_routes(app, service)
    app.add_middleware(PredictPath, service=service)

    return app


def _v2_routes(app: FastAPI, service: Service) -> None:
    """The Open Inference Protocol's GET endpoints (``infer`` is served by ``PredictPath``)."""

    def v2_error(exc: InputError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Under /v2 every error is the protocol's ``{"error": ...}`` (an unknown endpoint, a wrong method):
        clients such as tritonclient read that key. Elsewhere FastAPI's ``{"detail": ...}``."""
        if _route_path(request.scope).startswith("/v2"):
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.get("/v2", tags=["v2"])
    def v2_server() -> dict[str, Any]:
        return v2.server_metadata()

    @app.get("/v2/health/live", tags=["v2"])
    def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    def v2_ready() -> Response:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    def model(name: str, version: str | None, what: str) -> Response:
        try:
            v2.check_target(service.engine, name, version)
        except InputError as exc:
            return v2_error(exc)
        if what == "ready":
            return JSONResponse(
                {"name": name, "ready": service.ready}, status_code=200 if service.ready else 503
            )
        if what == "config":
            settings = service.settings
            return JSONResponse(
                v2.model_config(service.engine, settings.max_batch_size, settings.max_queue_delay_ms)
            )
        return JSONResponse(v2.model_metadata(service.engine))

    @app.get("/v2/models/{name}", tags=["v2"])
    def v2_model(name: str) -> Response:
        return model(name, None, "metadata")

    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    def v2_model_version(name: str, version: str) -> Response:
        return model(name, version, "metadata")

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    def v2_model_ready(name: str) -> Response:
        return model(name, None, "ready")

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    def v2_model_version_ready(name: str, version: str) -> Response:
        return model(name, version, "ready")

    @app.get("/v2/models/{name}/config", tags=["v2"], summary="Triton's model configuration")
    def v2_model_config(name: str) -> Response:
        return model(name, None, "config")

    @app.get(
        "/v2/models/{name}/versions/{version}/config", tags=["v2"], summary="Triton's model configuration"
    )
    def v2_model_version_config(name: str, version: str) -> Response:
        return model(name, version, "config")

    @app.post("/v2/models/{name}/infer", tags=["v2"], summary="Open Inference Protocol inference")
    async def v2_infer(name: str, request: Request) -> Response:  # documents it; PredictPath serves it
        code, body, extra = await service.infer_v2(name, None, request.headers, request.stream())
        return Response(body, status_code=code, headers=extra)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer", tags=["v2"], summary="Open Inference Protocol inference"
    )
    async def v2_infer_version(name: str, version: str, request: Request) -> Response:
        code, body, extra = await service.infer_v2(name, version, request.headers, request.stream())
        return Response(body, status_code=code, headers=extra)


def settings_from_env(**overrides: Any) -> Settings:
    """``Settings(**overrides)``, kept for callers: the class itself reads the ``VIT_*`` variables.

    Keyword overrides win over the environment; see ``vit_consumer.settings``.
    """
    return Settings(**overrides)


def app_from_env() -> FastAPI:
    """For ``uvicorn vit_consumer.server:app_from_env --factory``: the model from ``VIT_MODEL_URI``.

    Everything else comes from ``Settings`` (``VIT_*``; the tracking URI from
    ``VIT_TRACKING_URI``, else ``MLFLOW_TRACKING_URI``).

    Raises:
        SettingsError: ``VIT_MODEL_URI`` is not set, or a ``VIT_*`` value is invalid.
    """
    uri = os.environ.get("VIT_MODEL_URI", "").strip()
    if not uri:
        raise SettingsError(
            "VIT_MODEL_URI is not set: the model to serve, a .onnx file or models:/<name>@<alias>"
        )
    settings = Settings()
    providers = list(settings.providers) if settings.providers else None
    classifier = OnnxClassifier.from_uri(uri, settings.tracking_uri, providers, spin=settings.spin,
                                         choose_for=settings.choose_for, engine=settings.engine,
                                         streams=settings.ov_streams)  # fmt: skip
    return create_app(classifier, settings)
