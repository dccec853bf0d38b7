"""The serving contract, stated once: what an exported model is and how it is served.

Both sides of the TensorFlow-free boundary import this module: vit-pipeline's
export, registry and benchmark write and check what it states, and the consumer
reads it. It needs numpy only (ONNX Runtime where a function says so).

* **Tensors.** Input ``images``: float32 ``[batch, H, W, 3]``, NHWC, raw RGB pixel
  values 0-255 (normalisation and resizing are inside the graph), dynamic batch.
  Output ``logits``: float32 ``[batch, num_classes]``, unnormalised.
* **Metadata** (the file's ``metadata_props``, all strings): the ``META_*`` keys.
* **Serving candidates.** Other files that passed the export's agreement gate
  travel with the served one, listed in a manifest (``CandidatesManifest``); the
  machine that serves times them and serves the fastest (``fastest``).
* **Providers.** Which ONNX Runtime execution providers to ask for
  (``default_providers``; one environment variable, ``VIT_PROVIDERS``).
* **Probabilities.** ``softmax`` and ``top_k`` turn logits into answers, at the file's
  calibrated temperature (``temperature``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The most images one inference call takes, anywhere (serve, benchmark, export): a typo of a few more digits
# allocated hundreds of GiB before anything said why.
MAX_BATCH_SIZE = 4096
MAX_TOP_K = 1000  # classes an answer lists per image

INPUT_NAME = "images"
OUTPUT_NAME = "logits"

# The image formats (Pillow's names) both sides read: the data stage takes image folders by file suffix
# (vit_pipeline.data.IMAGE_SUFFIXES, each one of these), the service takes these as request bodies. A model
# trained on a folder of WebP files can be sent its own files. JPEG's plugin opens a camera's MPO too.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA")
# Content-Types of an image body. application/octet-stream (what many clients send for a file) is sniffed:
# a .npy array by its magic string, else an image of one of IMAGE_FORMATS.
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif", "image/bmp",
                     "image/x-ms-bmp", "image/tiff", "image/x-portable-anymap", "image/x-portable-pixmap",
                     "image/x-portable-graymap", "image/x-portable-bitmap", "image/x-tga", "image/x-targa")  # fmt: skip

# metadata_props keys of an exported file.
META_CLASS_NAMES = "class_names"
META_NUM_CLASSES = "num_classes"
META_INPUT_NAME = "input_name"
META_INPUT_SHAPE = "input_shape"
META_INPUT_CONTRACT = "input_contract"
META_OUTPUT_NAME = "output_name"
META_OUTPUT_CONTRACT = "output_contract"
META_DATASET = "dataset"
META_TEST_ACCURACY = "test_accuracy"
META_RUN_ID = "mlflow_run_id"
META_VERSION = "vit_pipeline_version"
# The softmax temperature fitted on validation data (vit_pipeline.calibration): probabilities are
# softmax(logits / T). Absent (older files): 1. The logits, and so the graph, do not depend on it.
META_TEMPERATURE = "temperature"


def served_name(source: str | None, metadata: Mapping[str, str], path: str | Path) -> str:
    """The name clients address a model by (Open Inference Protocol ``/v2/models/<name>``): the registered
    model's, else ``vit-<dataset>``, else the file's stem. The consumer answers to it and ``export-serving``
    names the Triton model folder after it, so a client moves from one to the other unchanged."""
    source = source or ""
    if source.startswith("models:/"):
        return re.split(r"[@/]", source[len("models:/") :], maxsplit=1)[0]
    dataset = metadata.get(META_DATASET, "")
    return f"vit-{dataset}" if dataset else Path(path).stem


def triton_tensors(input_shape: Sequence[int], num_classes: int) -> dict[str, list[dict[str, Any]]]:
    """The model's tensors as NVIDIA Triton's model configuration states them (its JSON field names): the
    ``config.pbtxt`` that ``export-serving`` writes and the consumer's ``/v2/models/<name>/config`` say this."""
    h, w, c = input_shape
    return {
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NHWC", "dims": [h, w, c]}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [num_classes],
                    "label_filename": "labels.txt"}],
    }  # fmt: skip


def input_contract(input_shape: Sequence[int]) -> str:
    """The input's contract in words, for the metadata and people."""
    h, w, c = input_shape
    return (
        f"{INPUT_NAME}: float32 [batch, {h}, {w}, {c}] NHWC, raw RGB pixel values 0-255 "
        "(normalization and resizing are inside the graph), dynamic batch"
    )


def build_metadata(
    class_names: Sequence[str],
    input_shape: Sequence[int],
    *,
    producer_version: str,
    dataset: str = "",
    test_accuracy: float | None = None,
    run_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` an exported file carries (all values are strings)."""
    meta = {
        META_CLASS_NAMES: json.dumps(list(class_names)),
        META_NUM_CLASSES: str(len(class_names)),
        META_INPUT_NAME: INPUT_NAME,
        META_INPUT_SHAPE: json.dumps([None, *input_shape]),
        META_INPUT_CONTRACT: input_contract(input_shape),
        META_OUTPUT_NAME: OUTPUT_NAME,
        META_OUTPUT_CONTRACT: f"{OUTPUT_NAME}: float32 [batch, {len(class_names)}], unnormalised logits",
        META_DATASET: dataset,
        META_TEST_ACCURACY: "" if test_accuracy is None else f"{test_accuracy:.6f}",
        META_RUN_ID: run_id or "",
        META_VERSION: producer_version,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def temperature(metadata: Mapping[str, str]) -> float:
    """The softmax temperature a file's metadata declares (1 when it declares none).

    Raises:
        ValueError: the value is not a finite number > 0.
    """
    raw = metadata.get(META_TEMPERATURE, "")
    try:
        value = float(raw) if raw != "" else 1.0
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(
            f"Expected a finite {META_TEMPERATURE} > 0 in the model's metadata. Received: {raw!r}"
        )
    return value


def class_names(metadata: Mapping[str, str]) -> list[str] | None:
    """The class names a file's metadata declares (None: not a vit-pipeline export).

    Raises:
        ValueError: the metadata is not a JSON list of names.
    """
    if META_CLASS_NAMES not in metadata:
        return None
    try:
        names = json.loads(metadata[META_CLASS_NAMES])
    except ValueError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"Expected {META_CLASS_NAMES} metadata to be a JSON list of names. "
                         f"Received: {metadata[META_CLASS_NAMES][:80]!r}")  # fmt: skip
    return names


def io_problem(
    inputs: list[list[int | None]],
    outputs: list[list[int | None]],
    num_classes: int | None,
    dtypes: tuple[str, str] | None = None,
    batched: bool = True,
) -> str | None:
    """What keeps a model's inputs and outputs from this contract, or None.

    The contract: one image input [batch, H, W, 3] of fixed H and W, logits [batch, one per class name] first
    (``num_classes`` None: any number of them); the batch size dynamic (``batched``: the batcher, and Triton's
    ORT backend with ``max_batch_size``, run any batch; a benchmark of one size need not); float32 in and out (``dtypes``: the input's and the first output's
    numpy names, where known).

    Args:
        inputs: The inputs' shapes, None for a dynamic size (``ort_dims``).
        outputs: The outputs' shapes, likewise.
    """
    if len(inputs) != 1 or len(inputs[0]) != 4 or None in inputs[0][1:] or inputs[0][3] != 3:
        return f"Expected one input [batch, H, W, 3] (RGB images). Received: inputs {_shapes(inputs)}"
    if (
        not outputs
        or len(outputs[0]) != 2
        or (num_classes is not None and outputs[0][1] not in (None, num_classes))
    ):
        per_class = "classes]" if num_classes is None else f"{num_classes}] (one per class name)"
        return (
            f"Expected logits [batch, {per_class} as the first output. Received: outputs {_shapes(outputs)}"
        )
    if batched and (inputs[0][0] is not None or outputs[0][0] is not None):
        return (f"Expected a dynamic batch size (the first dimension). Received: inputs {_shapes(inputs)}, "
                f"outputs {_shapes(outputs)}")  # fmt: skip
    if dtypes is not None and tuple(dtypes) != ("float32", "float32"):
        return f"Expected float32 images in and float32 logits out. Received: {dtypes[0]} in, {dtypes[1]} out"
    return None


def _shapes(shapes: list[list[int | None]]) -> str:
    return (
        ", ".join("[" + ", ".join("?" if d is None else str(d) for d in s) + "]" for s in shapes)[:200]
        or "none"
    )


def ort_dims(args) -> list[list[int | None]]:
    """The shapes of ONNX Runtime's ``get_inputs()``/``get_outputs()``, None for a named or unknown size."""
    return [[d if isinstance(d, int) else None for d in (a.shape or [])] for a in args]


_ORT_TYPES = {"float": "float32", "double": "float64"}


def ort_dtype(arg) -> str:
    """The numpy name of an ONNX Runtime input's or output's element type (``tensor(float)``: float32)."""
    name = str(arg.type).removeprefix("tensor(").removesuffix(")")
    return _ORT_TYPES.get(name, name)


def ort_io(session) -> tuple[list[list[int | None]], list[list[int | None]], tuple[str, str] | None]:
    """An ONNX Runtime session's inputs' and outputs' shapes and its first input's and output's element types:
    ``io_problem``'s arguments, read the same way on both sides (the consumer's engine, ``export-serving``)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    dtypes = (ort_dtype(inputs[0]), ort_dtype(outputs[0])) if inputs and outputs else None
    return ort_dims(inputs), ort_dims(outputs), dtypes


def run_batches(session, images: np.ndarray, batch_size: int, on_batch=None) -> np.ndarray:
    """Logits of ``images`` from an ONNX Runtime session, ``batch_size`` at a time.

    Args:
        on_batch: Called with the number of images after each batch (progress).
    """
    out = []
    for i in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0])
        if on_batch is not None:
            on_batch(len(chunk))
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------ candidates
MANIFEST_NAME = "candidates.json"
# Where the registered model keeps the candidates and their manifest (MLflow's extra_files).
REGISTERED_DIR = "extra_files"


@dataclass(frozen=True)
class CandidatesManifest:
    """The serving candidates registered beside the served file, and what their gate measured.

    Attributes:
        served_variant: The variant of the registered (default) file.
        min_agreement: The top-1 agreement with Keras each candidate needed.
        candidates: Variant name -> its gate figures, with ``file`` (a name in the
            manifest's folder).
        gate: The gate's real test images for the machine that serves: ``file`` (an
            ``.npz`` in the folder with ``images``, uint8 or float32 NHWC, and
            ``logits``, the fp32 Keras model's), ``images`` (their count). None: none
            registered (then only the candidates gated at export are considered).
    """

    served_variant: str
    min_agreement: float
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: dict[str, Any] | None = None

    def write(self, folder: str | Path) -> Path:
        """Writes ``folder/candidates.json`` atomically; returns its path."""
        path = Path(folder) / MANIFEST_NAME
        doc = {"served_variant": self.served_variant, "min_agreement": self.min_agreement,
               "candidates": self.candidates, **({"gate": self.gate} if self.gate else {})}  # fmt: skip
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> CandidatesManifest:
        """Reads a manifest; ValueError (with the path) if it is not one."""
        try:
            doc = json.loads(Path(path).read_text())
            candidates = {str(n): dict(c) for n, c in doc["candidates"].items()}
            if not all(isinstance(c.get("file"), str) for c in candidates.values()):
                raise ValueError("a candidate without a file name")
            gate = doc.get("gate")
            if gate is not None and not (isinstance(gate, dict) and _plain_name(gate.get("file"))):
                raise ValueError("a gate without a plain file name")
            if not all(_plain_name(c["file"]) for c in candidates.values()):
                raise ValueError("a file name with a folder in it")
            return cls(str(doc["served_variant"]), float(doc["min_agreement"]), candidates, gate)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"Not a candidates manifest: {path} ({exc})") from exc

    @classmethod
    def find(cls, folder: str | Path) -> CandidatesManifest | None:
        """The manifest in ``folder``, None if there is none."""
        path = Path(folder) / MANIFEST_NAME
        return cls.read(path) if path.is_file() else None

    def files(self, folder: str | Path) -> dict[str, Path]:
        """Candidate name -> its file in ``folder`` (where the manifest lies)."""
        return {name: Path(folder) / c["file"] for name, c in self.candidates.items()}

    def gate_file(self, folder: str | Path) -> Path | None:
        """The gate images' file in ``folder`` (None: none registered)."""
        return Path(folder) / self.gate["file"] if self.gate else None


def _plain_name(name: Any) -> bool:
    """A file name without a folder (a manifest from a store must not point elsewhere)."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def geometric_mean(values: Iterable[float]) -> float:
    """The geometric mean of throughputs (how a file is scored over batch sizes); 0 if any is 0
    (a file that did not run at one batch size cannot be the fastest)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0 or (arr < 0).any() or not np.isfinite(arr).all():
        raise ValueError(f"Expected finite throughputs >= 0. Received: {arr.tolist()}")
    if (arr == 0).any():
        return 0.0
    return float(np.exp(np.log(arr).mean()))


def fastest(throughputs: Mapping[str, Iterable[float]]) -> tuple[str, dict[str, float]]:
    """The fastest of several files: the highest geometric mean of img/s over batch sizes.

    The geometric mean weighs a lone request and a full batch alike (an arithmetic
    mean would let the large batch decide alone).

    Args:
        throughputs: Name -> img/s at each batch size (the same sizes for all).

    Returns:
        (the fastest name, every name's score).
    """
    scores = {name: geometric_mean(ips) for name, ips in throughputs.items()}
    if not scores:
        raise ValueError("Expected at least one candidate to choose from")
    return max(scores, key=scores.get), scores


# ------------------------------------------------------------------- providers
PROVIDERS_ENV = "VIT_PROVIDERS"
_OLD_PROVIDERS_ENV = "VIT_CONSUMER_PROVIDERS"  # read with a deprecation warning
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


def split_providers(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"CUDAExecutionProvider, CPUExecutionProvider"`` (or a sequence) -> a tuple; blank -> None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(p.strip() for p in items if p.strip())
    return names or None


def unknown_providers(names: Sequence[str]) -> list[str]:
    """The names ONNX Runtime does not know (``onnxruntime.get_all_providers()``): a typo it would drop with a
    warning, running on CPU. A known provider this build or machine cannot run is not one of them."""
    import onnxruntime as ort

    known = ort.get_all_providers()
    return [name for name in names if name not in known]


def gpu_visible() -> bool:
    """Whether an NVIDIA device is there to use (driver node present, not hidden by CUDA_VISIBLE_DEVICES).

    onnxruntime-gpu lists CUDA and TensorRT even on machines without a GPU and then
    falls back to CPU with a page of errors: ask for them only where this is true.
    """
    return Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


def requested_providers() -> tuple[str, ...] | None:
    """Providers named by ``VIT_PROVIDERS`` (None: not set)."""
    wanted = split_providers(os.environ.get(PROVIDERS_ENV))
    if wanted is None and os.environ.get(_OLD_PROVIDERS_ENV):
        warnings.warn(
            f"{_OLD_PROVIDERS_ENV} is deprecated; set {PROVIDERS_ENV}", DeprecationWarning, stacklevel=2
        )
        wanted = split_providers(os.environ[_OLD_PROVIDERS_ENV])
    return wanted


def default_providers(gpu_providers: Sequence[str] = (CUDA,), use_env: bool = True) -> list[str]:
    """Execution providers to request when the caller names none.

    ``VIT_PROVIDERS`` when set (and ``use_env``); otherwise ``gpu_providers`` where an
    NVIDIA device is visible, then CPU, each only if this ONNX Runtime build has it.
    What a session really runs on is ``session.get_providers()``, never this list.
    """
    import onnxruntime as ort

    if use_env and (wanted := requested_providers()):
        return list(wanted)
    candidates = (*(gpu_providers if gpu_visible() else ()), CPU)
    return [p for p in candidates if p in ort.get_available_providers()]


# --------------------------------------------------------------- probabilities
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (stable: the row maximum is subtracted)."""
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0. Received: temperature={temperature}")
    scaled = np.asarray(logits)
    if not np.issubdtype(scaled.dtype, np.floating):
        scaled = scaled.astype(np.float32)
    if temperature != 1.0:
        scaled = scaled / np.asarray(temperature, dtype=scaled.dtype)
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, names: Sequence[str], k: int = 5, temperature: float = 1.0) -> list[list[dict]]:
    """The ``k`` most probable classes of each row: index, label and softmax probability.

    Ties keep the lower class index first (a stable sort), so answers are reproducible.
    """
    probs = softmax(logits, temperature)
    k = max(1, min(k, probs.shape[1]))
    out = []
    for row in probs:
        idx = np.argsort(-row, kind="stable")[:k]
        out.append([{"index": int(i), "label": names[i], "probability": float(row[i])} for i in idx])
    return out
