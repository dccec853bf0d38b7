"""HTTP service: ``GET /health`` and ``POST /predict`` (FastAPI).

``POST /predict?top_k=5`` accepts, by ``Content-Type``:

* ``image/png`` or ``image/jpeg``: one image as the raw body;
* ``application/json``: ``{"instances": [...]}`` raw pixel arrays
  ([N, H, W, 3] or [H, W, 3], values 0-255) or ``{"images_b64": ["<base64 PNG/JPEG>", ...]}``;
* ``application/x-npy``: a ``.npy`` array (loaded with ``allow_pickle=False``).

Bad input gets a 4xx with ``{"detail": "<one line>"}``: 400 (shape, dtype,
undecodable), 413 (payload or batch too large), 415 (unsupported type).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request

from vit_consumer.classifier import InputError, OnnxClassifier

DEFAULT_MAX_BYTES = 8 * 2**20


def create_app(classifier: OnnxClassifier, max_bytes: int = DEFAULT_MAX_BYTES) -> FastAPI:
    app = FastAPI(title="vit-consumer", version="0.1.0")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise InputError(f"Payload of {int(declared)} bytes exceeds the limit of {max_bytes}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise InputError(f"Payload exceeds the limit of {max_bytes} bytes", 413)
        if not body:
            raise InputError("Empty request body")
        return bytes(body)

    def parse(content_type: str, body: bytes) -> np.ndarray:
        if content_type in ("image/png", "image/jpeg", "image/jpg"):
            return classifier.decode_image(body)[None]
        if content_type == "application/x-npy":
            try:
                return np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise InputError(f"Not a readable .npy array (pickled arrays are refused): {exc}") from exc
        if content_type == "application/json":
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"Invalid JSON: {exc}") from exc
            if isinstance(doc, dict) and "instances" in doc:
                try:
                    return np.asarray(doc["instances"], dtype=np.float32)
                except (TypeError, ValueError) as exc:
                    raise InputError(f"'instances' must be a numeric array: {exc}") from exc
            if isinstance(doc, dict) and isinstance(doc.get("images_b64"), list) and doc["images_b64"]:
                try:
                    raw = [base64.b64decode(s, validate=True) for s in doc["images_b64"]]
                except (binascii.Error, TypeError) as exc:
                    raise InputError(f"'images_b64' holds invalid base64: {exc}") from exc
                return np.stack([classifier.decode_image(r) for r in raw])
            raise InputError('Expected JSON {"instances": [...]} or {"images_b64": [...]}')
        raise InputError(
            f"Unsupported Content-Type {content_type!r}; use image/png, image/jpeg, "
            "application/json or application/x-npy",
            415,
        )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **classifier.describe()}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> dict:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            batch = parse(content_type, await read_body(request))
            predictions = classifier.predict(batch, top_k)
        except InputError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from exc
        return {
            "predictions": predictions,
            "model": classifier.source,
            "providers": classifier.providers_used,
        }

    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn vit_consumer.server:app_from_env --factory``: reads VIT_MODEL_URI."""
    uri = os.environ["VIT_MODEL_URI"]
    classifier = OnnxClassifier.from_uri(uri, os.environ.get("MLFLOW_TRACKING_URI"))
    return create_app(classifier, int(os.environ.get("VIT_MAX_BYTES", DEFAULT_MAX_BYTES)))
