"""ONNX export with a parity gate.

Contract of the exported model (what consumers rely on):

* input ``images``: float32 ``[batch, H, W, 3]`` (32x32 for CIFAR), raw RGB pixel
  values 0-255, NHWC, dynamic batch. Normalization and resizing are inside the
  graph; no augmentation or dropout (exported from ``model(x, training=False)``).
* output ``logits``: float32 ``[batch, num_classes]`` (apply softmax for
  probabilities).
* ``metadata_props``: ``class_names`` (JSON list), ``input_contract``,
  ``output_contract``, ``dataset``, ``test_accuracy``, ``mlflow_run_id``,
  ``vit_pipeline_version`` and more (see ``build_metadata``).

tf2onnx writes a model even when it cannot convert an op (it only logs
"Unsupported ops"); ``check_graph`` refuses such a graph before anything is
saved, and ``check_parity`` runs the saved file in ONNX Runtime against Keras.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline import __version__
from vit_pipeline.errors import PipelineError
from vit_pipeline.fsutil import atomic_path
from vit_pipeline.progress import quiet, task

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Ops that must never be in a served graph: training-time randomness.
FORBIDDEN_OPS = {
    "Dropout",
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Multinomial",
}


class ExportError(PipelineError):
    """The export produced an invalid graph, or its outputs disagree with Keras."""


@dataclass
class ParityReport:
    """Keras vs ONNX Runtime on the same images, per batch size."""

    num_images: int
    batch_sizes: list[int]
    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    provider: str
    per_batch: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement >= 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def input_contract(input_shape: tuple[int, int, int]) -> str:
    h, w, c = input_shape
    return (
        f"{INPUT_NAME}: float32 [batch, {h}, {w}, {c}] NHWC, raw RGB pixel values 0-255 "
        "(normalization and resizing are inside the graph), dynamic batch"
    )


def build_metadata(
    class_names: list[str],
    input_shape: tuple[int, int, int],
    dataset: str = "",
    test_accuracy: float | None = None,
    run_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (all values are strings)."""
    meta = {
        "class_names": json.dumps(list(class_names)),
        "num_classes": str(len(class_names)),
        "input_name": INPUT_NAME,
        "input_shape": json.dumps([None, *input_shape]),
        "input_contract": input_contract(input_shape),
        "output_name": OUTPUT_NAME,
        "output_contract": f"{OUTPUT_NAME}: float32 [batch, {len(class_names)}], unnormalised logits",
        "dataset": dataset,
        "test_accuracy": "" if test_accuracy is None else f"{test_accuracy:.6f}",
        "mlflow_run_id": run_id or "",
        "vit_pipeline_version": __version__,
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def convert(model, opset: int = 17):
    """Converts a Keras model to an ONNX ModelProto (inference mode, dynamic batch)."""
    import tensorflow as tf
    import tf2onnx

    shape = tuple(model.inputs[0].shape[1:])
    spec = (tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(images):
        # training=False: random augmentation and dropout are not in the graph.
        return {OUTPUT_NAME: model(images, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def check_graph(proto) -> None:
    """Refuses graphs that ONNX Runtime could not load or that train-time ops leak into.

    Raises:
        ExportError: unknown ops (tf2onnx's "unsupported ops"), random or dropout
            ops, wrong input/output names, or an ``onnx.checker`` failure.
    """
    import onnx

    unknown = sorted(
        {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}
    )
    if unknown:
        raise ExportError(
            f"ONNX export contains ops that are not ONNX operators: {unknown} "
            "(tf2onnx could not convert them; e.g. Keras' exact GELU lowers to Erfc)"
        )
    leaked = sorted({n.op_type for n in proto.graph.node} & FORBIDDEN_OPS)
    if leaked:
        raise ExportError(f"ONNX export contains training-time ops {leaked}; export with training=False")
    names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(
            f"Expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}. Received: {names}"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the export: {exc}") from exc


def export_onnx(model, path: str | Path, metadata: dict[str, str], opset: int = 17) -> dict[str, Any]:
    """Converts, checks, stamps metadata and writes the ONNX file atomically.

    Returns:
        ``{"path", "export_seconds", "opset", "size_bytes", "ops"}``.
    """

    start = time.perf_counter()
    with task(f"Export: Keras -> ONNX (tf2onnx, opset {opset})"):
        proto = convert(model, opset)
        check_graph(proto)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "vit-pipeline"
    proto.producer_version = __version__
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    seconds = time.perf_counter() - start
    ops = sorted({n.op_type for n in proto.graph.node})
    log.info("Exported %s in %.1f s (opset %d, ops %s)", path, seconds, opset, ops)
    return {"path": str(path), "export_seconds": seconds, "opset": opset,
            "size_bytes": path.stat().st_size, "ops": ops}  # fmt: skip


@contextlib.contextmanager
def quiet_onnxruntime():
    """Silences ONNX Runtime's and mlflow.onnx's provider-fallback messages inside the block.

    MLflow checks a logged ONNX model by opening it with its default providers
    (CUDA, then CPU); onnxruntime-gpu on a machine without CUDA libraries then
    prints a red ERROR and MLflow a WARNING, although the CPU provider works and
    nothing failed. The logged model keeps requesting CUDA first, so a GPU
    machine that loads it later still gets the GPU.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # FATAL only
    mlflow_onnx = logging.getLogger("mlflow.onnx")
    previous = mlflow_onnx.level
    mlflow_onnx.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default: WARNING
        mlflow_onnx.setLevel(previous)


def ort_session(path: str | Path, providers: list[str] | None = None):
    """An ONNX Runtime session; raises ExportError if the file does not load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def run_onnx(session, images: np.ndarray, batch_size: int, shown=None) -> np.ndarray:
    """Logits of ``images`` in batches; ``shown`` (a progress tracker) advances per image."""

    shown = shown or quiet()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size].astype(np.float32)})[0])
        shown.advance(len(out[-1]))
    return np.concatenate(out, axis=0)


def check_parity(
    keras_logits: np.ndarray,
    onnx_path: str | Path,
    images: np.ndarray,
    batch_sizes: tuple[int, ...] = (1, 64),
    tolerance: float = 1e-3,
) -> ParityReport:
    """Compares Keras logits with ONNX Runtime (CPU) on the same images.

    Args:
        keras_logits: ``model(images, training=False)`` from Keras.
        onnx_path: The exported file.
        images: Real test images (uint8 or float32, raw pixels).
        batch_sizes: ONNX Runtime is run at each of these batch sizes.
        tolerance: Largest allowed absolute logit difference.
    """

    session = ort_session(onnx_path)
    ref_top1 = keras_logits.argmax(axis=1)
    per_batch: dict[str, dict[str, float]] = {}
    with task(
        f"Parity: Keras vs ONNX Runtime, {Path(onnx_path).name}", len(images) * len(batch_sizes)
    ) as shown:
        for bs in batch_sizes:
            logits = run_onnx(session, images, bs, shown)
            per_batch[str(bs)] = {
                "max_abs_diff": float(np.abs(logits - keras_logits).max()),
                "top1_agreement": float(np.mean(logits.argmax(axis=1) == ref_top1)),
            }
    return ParityReport(
        num_images=int(len(images)),
        batch_sizes=list(batch_sizes),
        max_abs_diff=max(v["max_abs_diff"] for v in per_batch.values()),
        top1_agreement=min(v["top1_agreement"] for v in per_batch.values()),
        tolerance=tolerance,
        provider=session.get_providers()[0],
        per_batch=per_batch,
    )


def parity_gate(report: ParityReport) -> None:
    """Raises ExportError unless the export matches Keras within tolerance, 100% top-1."""
    if not report.passed:
        raise ExportError(
            f"ONNX parity gate failed on {report.num_images} images: max |logit diff| "
            f"{report.max_abs_diff:.3g} (tolerance {report.tolerance:g}), top-1 agreement "
            f"{report.top1_agreement:.2%} (required 100%); nothing registered"
        )
