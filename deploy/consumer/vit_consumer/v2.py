"""The Open Inference Protocol (KServe v2 REST), beside ``/predict``.

What NVIDIA Triton, KServe, OpenVINO Model Server and Seldon MLServer serve, so that a client
written for any of them (``tritonclient.http``, the ``kserve`` SDK's ``InferenceRESTClient``)
talks to this service unchanged:

* ``GET /v2`` (server metadata, with the ``binary_tensor_data`` extension),
  ``GET /v2/health/live``, ``GET /v2/health/ready``;
* ``GET /v2/models/{name}[/versions/{version}]`` (model metadata: the input ``images`` FP32
  ``[-1, H, W, 3]``, the outputs ``logits`` and ``probabilities`` FP32 ``[-1, C]``, and as
  parameters the class names, the temperature, the engine and its precision) and
  ``.../ready``;
* ``POST /v2/models/{name}[/versions/{version}]/infer``: JSON tensors (``data`` flat in
  row-major order, or nested), or the binary tensor data extension (the JSON header first,
  its length in ``Inference-Header-Content-Length``, then each input's raw little-endian bytes
  where its ``parameters.binary_data_size`` says). Outputs: those requested (``logits``,
  ``probabilities``: ``softmax(logits / temperature)`` with the file's calibrated temperature),
  else both; binary where ``parameters.binary_data`` (or the request's
  ``binary_data_output``) asks for it.

Errors are ``{"error": "<one line>"}``: 400 for a bad request, 404 for an unknown model or
version (and the same 413/503/504 as ``/predict`` for the same limits). The images go through
the service's dynamic batcher, admission limits and metrics (``vit_consumer.server``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from vit_consumer import __version__, contract
from vit_consumer.classifier import InputError, OnnxClassifier

EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}  # fmt: skip  # numeric types a client may send pixels as; converted to the model's float32
OUTPUTS = ("logits", "probabilities")
PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?/?$")


class V2Error(InputError):
    """A protocol error: answered as ``{"error": message}`` with its status."""


def server_metadata() -> dict[str, Any]:
    return {"name": "vit-consumer", "version": __version__, "extensions": EXTENSIONS}


def model_name(engine: OnnxClassifier) -> str:
    """The name clients address: the registered model's, else ``vit-<dataset>``, else the file's stem."""
    source = engine.source or ""
    if source.startswith("models:/"):
        return re.split(r"[@/]", source[len("models:/") :], maxsplit=1)[0]
    dataset = engine.metadata.get(contract.META_DATASET, "")
    return f"vit-{dataset}" if dataset else engine.path.stem


def model_version(engine: OnnxClassifier) -> str:
    return str(engine.version or "1")


def match(path: str) -> tuple[str, str | None, str] | None:
    """``/v2/models/<name>[/versions/<v>][/ready|/infer]`` -> (name, version, what), else None."""
    found = PATH.match(path)
    if found is None:
        return None
    return found["name"], found["version"], (found["rest"] or "").strip("/") or "metadata"


def check_target(engine: OnnxClassifier, name: str, version: str | None) -> None:
    if name != model_name(engine):
        raise V2Error(f"Unknown model {name[:80]!r}; this server serves {model_name(engine)!r}", 404)
    if version is not None and version != model_version(engine):
        raise V2Error(f"Unknown version {version[:40]!r} of {name!r}; serving version {model_version(engine)!r}",
                      404)  # fmt: skip


def model_metadata(engine: OnnxClassifier) -> dict[str, Any]:
    h, w, c = engine.input_shape
    classes = len(engine.class_names)
    return {
        "name": model_name(engine),
        "versions": [model_version(engine)],
        "platform": f"{engine.runtime.name}_onnx",  # onnxruntime_onnx / openvino_onnx, as Triton names them
        "inputs": [{"name": engine.input_name, "datatype": "FP32", "shape": [-1, h, w, c]}],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, classes]} for name in OUTPUTS],
        "parameters": {
            "class_names": json.dumps(engine.class_names),
            "temperature": engine.temperature,
            "engine": engine.engine,
            "precision": engine.runtime.precision,
            "providers": ",".join(engine.providers_used),
            "file": engine.path.name,
            "candidate": json.dumps(engine.candidate),
        },
    }


def _header_and_binary(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        raw, rest = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise V2Error(f"Inference-Header-Content-Length {header_length[:20]!r} does not fit a body of "
                          f"{len(body)} bytes")  # fmt: skip
        n = int(header_length)
        raw, rest = body[:n], body[n:]
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise V2Error(f"Invalid JSON inference request: {exc}") from None
    if not isinstance(doc, dict):
        raise V2Error("Expected a JSON object with 'inputs'")
    return doc, rest


def _tensor(spec: Any, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor from its JSON spec (and the binary section at ``offset``)."""
    if not isinstance(spec, dict):
        raise V2Error("Expected each input to be an object with name, shape, datatype and data")
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise V2Error(f"Unsupported datatype {str(datatype)[:20]!r}; use one of {sorted(DATATYPES)}")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise V2Error(f"Expected 'shape' to be a list of sizes >= 0. Received: {str(shape)[:80]}")
    dtype = DATATYPES[datatype]
    count = int(np.prod(shape))
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise V2Error(f"binary_data_size {size} does not match shape {shape} of {datatype} "
                          f"({count * dtype.itemsize} bytes) or the body")  # fmt: skip
        array = np.frombuffer(binary, dtype, count, offset)
        return array.reshape(shape), offset + size
    if "data" not in spec:
        raise V2Error(f"Input {spec.get('name')!r} has neither 'data' nor parameters.binary_data_size")
    try:
        array = np.asarray(spec["data"], dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise V2Error(f"Input {spec.get('name')!r}: 'data' must be numbers of datatype {datatype}") from None
    if array.size != count:
        raise V2Error(f"Input {spec.get('name')!r}: {array.size} values for shape {shape} ({count})")
    return array.reshape(shape), offset


def parse_infer(engine: OnnxClassifier, body: bytes, header_length: str | None
                ) -> tuple[np.ndarray, dict[str, Any], list[tuple[str, bool]]]:  # fmt: skip
    """An infer request -> (checked float32 images, the request document, [(output, binary)])."""
    doc, binary = _header_and_binary(body, header_length)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise V2Error(f"Expected exactly one input, {engine.input_name!r}")
    if not isinstance(inputs[0], dict) or inputs[0].get("name") != engine.input_name:
        got = inputs[0].get("name") if isinstance(inputs[0], dict) else inputs[0]
        raise V2Error(f"Unknown input {str(got)[:40]!r}; the model's input is {engine.input_name!r}")
    array, used = _tensor(inputs[0], binary, 0)
    if used != len(binary):
        raise V2Error(f"{len(binary) - used} bytes of binary data no input claims")
    images = engine.check_array(array)  # the contract: [N, H, W, 3], finite, 0-255
    binary_default = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    requested = doc.get("outputs")
    if requested is None:
        return images, doc, [(name, binary_default) for name in OUTPUTS]
    if not isinstance(requested, list) or not requested:
        raise V2Error("Expected 'outputs' to be a non-empty list")
    wanted = []
    for out in requested:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in OUTPUTS:
            raise V2Error(f"Unknown output {str(name)[:40]!r}; the outputs are {list(OUTPUTS)}")
        binary = (out.get("parameters") or {}).get("binary_data", binary_default)
        wanted.append((name, bool(binary)))
    return images, doc, wanted


def infer_response(engine: OnnxClassifier, doc: dict[str, Any], logits: np.ndarray,
                   wanted: list[tuple[str, bool]]) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """The response body and headers (binary outputs after the JSON header, when any)."""
    values = {"logits": np.asarray(logits, np.float32)}
    if any(name == "probabilities" for name, _ in wanted):
        values["probabilities"] = contract.softmax(values["logits"], engine.temperature).astype(np.float32)
    outputs, chunks = [], []
    for name, binary in wanted:
        array = np.ascontiguousarray(values[name], dtype="<f4")
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            out["parameters"] = {"binary_data_size": array.nbytes}
            chunks.append(array.tobytes())
        else:
            if not np.isfinite(array).all():
                raise ValueError("the model returned non-finite values")
            out["data"] = array.ravel().tolist()
        outputs.append(out)
    answer = {"model_name": model_name(engine), "model_version": model_version(engine), "outputs": outputs}
    if "id" in doc:
        answer["id"] = doc["id"]
    header = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(header))}  # fmt: skip
