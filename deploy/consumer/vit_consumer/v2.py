"""The Open Inference Protocol (KServe v2 REST), beside ``/predict``.

What NVIDIA Triton, KServe, OpenVINO Model Server and Seldon MLServer serve, so that a client
written for any of them (``tritonclient.http``, the ``kserve`` SDK's ``InferenceRESTClient``)
talks to this service unchanged:

* ``GET /v2`` (server metadata, with the ``binary_tensor_data``, ``classification`` and
  ``model_configuration`` extensions),
  ``GET /v2/health/live``, ``GET /v2/health/ready``;
* ``GET /v2/models/{name}[/versions/{version}]`` (model metadata: the input ``images`` FP32
  ``[-1, H, W, 3]``, the outputs ``logits`` and ``probabilities`` FP32 ``[-1, C]``, and as
  parameters the class names, the temperature, the engine and its precision), ``.../ready``
  and ``.../config`` (Triton's model configuration, as ``export-serving``'s ``config.pbtxt``);
* ``POST /v2/models/{name}[/versions/{version}]/infer`` (at most ``max_batch_size`` images): JSON tensors (``data`` flat in
  row-major order, or nested), or the binary tensor data extension (the JSON header first,
  its length in ``Inference-Header-Content-Length``, then each input's raw little-endian bytes
  where its ``parameters.binary_data_size`` says). Outputs: those requested (``logits``,
  ``probabilities``: ``softmax(logits / temperature)`` with the file's calibrated temperature),
  else both; binary where ``parameters.binary_data`` (or the request's
  ``binary_data_output``) asks for it; with ``parameters.classification: k`` (Triton's
  classification extension, tritonclient's ``class_count``) an output is each row's top k as
  BYTES ``"value:index:label"``. Request bodies may be gzip or deflate (``Content-Encoding``).

Errors are ``{"error": "<one line>"}``: 400 for a bad request, 404 for an unknown model or
version (and the same 413/503/504 as ``/predict`` for the same limits). The images go through
the service's dynamic batcher, admission limits and metrics (``vit_consumer.server``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

import numpy as np

from vit_consumer import __version__, contract, limits
from vit_consumer.classifier import InputError, OnnxClassifier

# As Triton names them; `model_configuration`: the `/config` endpoint (read by perf_analyzer, image_client).
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]
HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
}  # fmt: skip  # numeric types a client may send pixels as; converted to the model's float32
OUTPUTS = ("logits", "probabilities")
PATH = re.compile(
    r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$"
)  # trailing slashes: PredictPath


class V2Error(InputError):
    """A protocol error: answered as ``{"error": message}`` with its status."""


class Output(NamedTuple):
    """A requested output: its name, raw bytes or JSON, and Triton's classification (top k, 0: off)."""

    name: str
    binary: bool
    classification: int = 0


def server_metadata() -> dict[str, Any]:
    return {"name": "vit-consumer", "version": __version__, "extensions": EXTENSIONS}


def model_name(engine: OnnxClassifier) -> str:
    return contract.served_name(engine.source, engine.metadata, engine.path)


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
            "parallel_requests": engine.runtime.parallel,
            "providers": ",".join(engine.providers_used),
            "file": engine.path.name,
            "candidate": json.dumps(engine.candidate),
        },
    }


def model_config(engine: OnnxClassifier, max_batch_size: int, queue_delay_ms: float) -> dict[str, Any]:
    """Triton's ``GET /v2/models/<name>/config`` (its JSON field names): the tensors as ``export-serving``'s
    ``config.pbtxt`` states them (``contract.triton_tensors``), plus ``probabilities``, this server's extra
    output. Triton's own tools (perf_analyzer, image_client) read the batch size and the input's layout here."""
    tensors = contract.triton_tensors(engine.input_shape, len(engine.class_names))
    tensors["output"].append({**tensors["output"][0], "name": "probabilities"})
    return {
        "name": model_name(engine),
        "platform": "onnxruntime_onnx",  # the file's format, whichever engine runs it here (metadata says which)
        "max_batch_size": max_batch_size,
        **tensors,
        "dynamic_batching": {"max_queue_delay_microseconds": int(round(queue_delay_ms * 1000))},
        "version_policy": {"specific": {"versions": [int(model_version(engine))]}},
        "parameters": {"temperature": {"string_value": f"{engine.temperature:g}"}},
    }


def _no_shared_memory(params: dict[str, Any], kind: str, name: Any) -> None:
    """Refuses a shared-memory region (the message is built only then: this runs for every tensor)."""
    if any(key.startswith("shared_memory") for key in params):
        raise V2Error(f"{kind} {str(name)[:40]!r} asks for shared memory, which this server does not offer (no "
                      "shared-memory extension in /v2): send the tensor in the request body")  # fmt: skip


def _header_and_binary(body: bytes, header_length: str | None, max_depth: int, max_numbers: int
                       ) -> tuple[dict[str, Any], bytes]:  # fmt: skip
    if header_length is None:
        raw, rest = body, b""
    else:
        length = limits.header_int(header_length)
        if length is None or length > len(body):
            raise V2Error(f"Inference-Header-Content-Length {header_length[:20]!r} does not fit a body of "
                          f"{len(body)} bytes")  # fmt: skip
        raw, rest = body[:length], body[length:]
    try:
        doc = limits.parse_json(raw, max_depth, max_numbers, "JSON inference request")
    except limits.InvalidJson as exc:
        # Binary tensors sent without their header's length read as JSON that is not (said so, as Triton does).
        if header_length is None:
            raise V2Error(f"{exc} (a body with binary tensors needs the Inference-Header-Content-Length "
                          "header: the length of its JSON part)") from None  # fmt: skip
        raise
    if not isinstance(doc, dict):
        raise V2Error("Expected a JSON object with 'inputs'")
    if "id" in doc and not isinstance(doc["id"], str):
        raise V2Error(f"Expected 'id' to be a string. Received: {type(doc['id']).__name__}")
    return doc, rest


def _parameters(holder: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``parameters`` object (absent: empty)."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise V2Error(f"Expected {where} 'parameters' to be an object. Received: {type(params).__name__}")
    return params


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean parameter (the binary data extension's are JSON booleans, not truthy values)."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise V2Error(f"Expected parameter {key!r} to be true or false. Received: {str(value)[:20]!r}")
    return value


def _tensor(spec: Any, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor from its JSON spec (and the binary section at ``offset``)."""
    if not isinstance(spec, dict):
        raise V2Error("Expected each input to be an object with name, shape, datatype and data")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list or an object is unhashable
        raise V2Error(f"Unsupported datatype {str(datatype)[:20]!r}; use one of {sorted(DATATYPES)}")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d >= 0 for d in shape)):
        raise V2Error(f"Expected 'shape' to be a list of integer sizes >= 0. Received: {ascii(shape)[:80]}")
    dtype = DATATYPES[datatype]
    count = math.prod(shape)  # a Python int: a claimed shape cannot overflow it
    params = _parameters(spec, "the input's")
    _no_shared_memory(params, "Input", spec.get("name"))
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if "data" in spec:
            raise V2Error("An input has either 'data' or parameters.binary_data_size, not both")
        if type(size) is not int:  # a string, a float, null (as Triton: an integer or nothing)
            raise V2Error(f"Expected parameters.binary_data_size to be an integer number of bytes. Received: "
                          f"{json.dumps(size)[:20]}")  # fmt: skip
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise V2Error(f"binary_data_size {ascii(size)[:20]} does not match shape {shape} of {datatype} "
                          f"({count * dtype.itemsize} bytes) or the {len(binary) - offset} bytes sent")  # fmt: skip
        array = np.frombuffer(binary, dtype, count, offset)
        return array.reshape(shape), offset + size
    if "data" not in spec:
        raise V2Error(
            f"Input {str(spec.get('name'))[:40]!r} has neither 'data' nor parameters.binary_data_size"
        )
    array = limits.numbers(spec["data"], f"Input {str(spec.get('name'))[:40]!r}: 'data' of {datatype}", dtype)
    if array.size != count:
        raise V2Error(
            f"Input {str(spec.get('name'))[:40]!r}: {array.size} values for shape {shape} ({count})"
        )
    return array.reshape(shape), offset


def parse_infer(engine: OnnxClassifier, body: bytes, header_length: str | None, max_json_depth: int,
                max_json_numbers: int, max_batch_size: int) -> tuple[np.ndarray, dict[str, Any], list[Output]]:  # fmt: skip
    """An infer request -> (checked float32 images, the request document, the outputs to answer).

    The JSON part is held to the same depth and value limits as ``/predict``'s JSON. A batch larger than the
    ``max_batch_size`` ``/config`` states is refused, as Triton refuses it: a client that works here works
    against the Triton folder ``export-serving`` writes (``/predict`` takes larger requests and splits them).
    """
    doc, binary = _header_and_binary(body, header_length, max_json_depth, max_json_numbers)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise V2Error(f"Expected exactly one input, {engine.input_name!r}")
    if not isinstance(inputs[0], dict):
        raise V2Error("Expected each input to be an object with name, shape, datatype and data")
    if inputs[0].get("name") != engine.input_name:
        raise V2Error(f"Unknown input {str(inputs[0].get('name'))[:40]!r}; the model's input is "
                      f"{engine.input_name!r}")  # fmt: skip
    array, used = _tensor(inputs[0], binary, 0)
    if used != len(binary):
        raise V2Error(f"{len(binary) - used} bytes of binary data no input claims")
    # The metadata says [-1, H, W, 3]: /predict's one image without a batch axis is not a v2 request.
    if array.ndim != 4:
        raise V2Error(f"Input {engine.input_name!r}: expected shape [-1, {', '.join(map(str, engine.input_shape))}]. "
                      f"Received: shape={list(array.shape)}")  # fmt: skip
    if len(array) > max_batch_size:  # Triton's words (InferenceRequest::Normalize), and its 400
        raise V2Error(f"inference request batch-size must be <= {max_batch_size} for {model_name(engine)!r}")
    images = engine.check_array(array)  # the contract: [N, H, W, 3], finite, 0-255
    binary_default = _flag(_parameters(doc, "the request's"), "binary_data_output", False)
    requested = doc.get("outputs")
    if requested is None:
        return images, doc, [Output(name, binary_default) for name in OUTPUTS]
    if not isinstance(requested, list) or not requested:
        raise V2Error("Expected 'outputs' to be a non-empty list")
    wanted = []
    for out in requested:
        if not isinstance(out, dict):
            raise V2Error("Expected each requested output to be an object with a name")
        if not isinstance(out.get("name"), str) or out["name"] not in OUTPUTS:
            raise V2Error(f"Unknown output {str(out.get('name'))[:40]!r}; the outputs are {list(OUTPUTS)}")
        if any(w.name == out["name"] for w in wanted):  # as Triton: one answer per output name
            raise V2Error(f"Output {out['name']!r} is requested twice")
        params = _parameters(out, "an output's")
        _no_shared_memory(params, "Output", out["name"])
        classes = params.get("classification", 0)
        if type(classes) is not int or classes < 0:
            raise V2Error(f"Expected 'classification' to be an integer >= 0. Received: {str(classes)[:20]!r}")
        wanted.append(Output(out["name"], _flag(params, "binary_data", binary_default), classes))
    return images, doc, wanted


def _classification(values: np.ndarray, k: int, names: list[str]) -> np.ndarray:
    """Triton's classification extension: each row's ``k`` largest as ``"value:index:label"`` strings."""
    k = min(k, values.shape[1])
    top = np.argsort(-values, axis=1, kind="stable")[:, :k]  # ties: the lower index first, as top_k
    rows = [[f"{row[i]:f}:{i}:{names[i]}" for i in idx] for row, idx in zip(values, top, strict=True)]
    return np.array(rows, dtype=object).reshape(len(values), k)


def _bytes_tensor(strings: np.ndarray) -> bytes:
    """A BYTES tensor in the binary data extension: each element's length (uint32 LE), then its bytes."""
    parts = []
    for text in strings.ravel():
        raw = text.encode()
        parts += [len(raw).to_bytes(4, "little"), raw]
    return b"".join(parts)


def infer_response(engine: OnnxClassifier, doc: dict[str, Any], logits: np.ndarray,
                   wanted: list[Output]) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """The response body and headers (binary outputs after the JSON header, when any)."""
    values = {"logits": np.asarray(logits, np.float32)}
    if any(out.name == "probabilities" for out in wanted):
        values["probabilities"] = contract.softmax(values["logits"], engine.temperature).astype(np.float32)
    outputs, chunks = [], []
    for want in wanted:
        if want.classification:
            array = _classification(values[want.name], want.classification, engine.class_names)
            datatype, raw = "BYTES", _bytes_tensor(array) if want.binary else b""
        else:
            array = np.ascontiguousarray(values[want.name], dtype="<f4")
            datatype, raw = "FP32", array.tobytes() if want.binary else b""
            if not want.binary and not np.isfinite(array).all():
                raise ValueError("the model returned non-finite values")
        out: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(array.shape)}
        if want.binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
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
