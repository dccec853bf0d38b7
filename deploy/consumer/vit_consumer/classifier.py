"""Load an exported ViT ONNX model and classify images or raw pixel arrays.

The model's contract is read from its ``metadata_props`` (written by
vit-pipeline's export): ``class_names`` and the input shape. Input is raw RGB
pixels 0-255, NHWC, float32; images of any size and mode are converted to RGB and
resized to the model's input size (bilinear, as the training pipeline does).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 40_000_000  # refuse decompression bombs long before memory runs out
MAX_BATCH = 1024


class InputError(ValueError):
    """Bad input from a client; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _default_providers() -> list[str]:
    import onnxruntime as ort

    wanted = os.environ.get("VIT_CONSUMER_PROVIDERS")
    if wanted:
        return [p.strip() for p in wanted.split(",") if p.strip()]
    available = ort.get_available_providers()
    # onnxruntime-gpu lists CUDA even on machines without a GPU and then falls back
    # to CPU with a page of errors; ask for CUDA only where an NVIDIA device exists.
    # providers_used always reports what the session really runs on.
    gpu = Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu else ("CPUExecutionProvider",)
    return [p for p in wanted if p in available]


def resolve_model(uri: str, tracking_uri: str | None = None) -> Path:
    """A local ``.onnx`` path for a file, a directory, or an MLflow ``models:/`` / ``runs:/`` URI."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        try:
            import mlflow
            from mlflow.exceptions import MlflowException
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InputError("Loading from the MLflow registry needs mlflow-skinny installed") from exc
        if tracking_uri:
            # models:/ URIs resolve through the *registry* URI, which the
            # download_artifacts(tracking_uri=...) argument does not set.
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except (MlflowException, OSError) as exc:
            where = tracking_uri or mlflow.get_tracking_uri()
            raise InputError(f"Could not fetch {uri} from MLflow at {where}: {exc}".splitlines()[0]) from exc
    else:
        local = Path(uri)
    if local.is_dir():
        found = sorted(local.rglob("*.onnx"))
        if not found:
            raise InputError(f"No .onnx file under {local}")
        local = found[0]
    if not local.is_file():
        raise InputError(f"Model file does not exist: {local}")
    return local


class OnnxClassifier:
    """An ONNX Runtime session plus the class names and input contract from metadata.

    Args:
        path: A ``.onnx`` file.
        providers: Execution providers to request; default CUDA (if the build has
            it) then CPU. ``providers_used`` says what the session really runs on.
    """

    def __init__(
        self, path: str | os.PathLike, providers: list[str] | None = None, source: str | None = None
    ):
        import onnxruntime as ort

        self.path = Path(path)
        self.source = source or str(path)
        requested = providers or _default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), providers=requested)
        except Exception as exc:  # onnxruntime raises untyped errors for bad files
            raise InputError(f"Not a loadable ONNX model: {self.path} ({exc})") from exc
        self.providers_requested = requested
        self.providers_used = self.session.get_providers()
        missing = [p for p in requested if p not in self.providers_used]
        if missing:
            log.warning(
                "Requested providers %s are not usable here; running on %s", missing, self.providers_used
            )
        meta = self.session.get_modelmeta().custom_metadata_map
        if "class_names" not in meta:
            raise InputError(f"{self.path} has no class_names metadata; was it exported by vit-pipeline?")
        self.class_names: list[str] = json.loads(meta["class_names"])
        self.metadata = dict(meta)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_shape = tuple(int(d) for d in inp.shape[1:])  # (H, W, C)

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None, providers: list[str] | None = None):
        return cls(resolve_model(uri, tracking_uri), providers, source=uri)

    # ----------------------------------------------------------------- input
    def decode_image(self, payload: bytes) -> np.ndarray:
        """PNG/JPEG bytes -> float32 (H, W, 3) at the model's input size."""
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        h, w, _ = self.input_shape
        try:
            with Image.open(io.BytesIO(payload)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise InputError(f"Expected a PNG or JPEG image. Received: {img.format}", 415)
                rgb = img.convert("RGB")
                if rgb.size != (w, h):
                    rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.float32)
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"Could not decode the image: {exc}") from exc

    def check_array(self, array: Any) -> np.ndarray:
        """Validates raw pixels: shape [N, H, W, 3] or [H, W, 3], numeric, finite, 0-255."""
        arr = np.asarray(array)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
        ):
            raise InputError(f"Expected numeric pixel values. Received: dtype={arr.dtype}")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.input_shape:
            raise InputError(
                f"Expected shape [batch, {', '.join(map(str, self.input_shape))}] (raw RGB pixels, NHWC). "
                f"Received: shape={list(arr.shape)}"
            )
        if not 1 <= len(arr) <= MAX_BATCH:
            raise InputError(f"Expected 1 to {MAX_BATCH} images. Received: {len(arr)}", 413)
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise InputError("Expected raw pixel values in [0, 255]")
        return arr

    # ------------------------------------------------------------ inference
    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: self.check_array(batch)})[0]

    def predict(self, batch: Any, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k classes with softmax probabilities for each image."""
        logits = self.logits(batch)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        k = max(1, min(top_k, probs.shape[1]))
        out = []
        for row in probs:
            idx = np.argsort(-row, kind="stable")[:k]
            out.append(
                [{"index": int(i), "label": self.class_names[i], "probability": float(row[i])} for i in idx]
            )
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.source,
            "num_classes": len(self.class_names),
            "input": {"name": self.input_name, "shape": ["batch", *self.input_shape], "dtype": "float32"},
            "providers": self.providers_used,
            "dataset": self.metadata.get("dataset", ""),
            "test_accuracy": self.metadata.get("test_accuracy", ""),
            "mlflow_run_id": self.metadata.get("mlflow_run_id", ""),
        }
