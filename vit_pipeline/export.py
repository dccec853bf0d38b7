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
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from vit_consumer import contract

from vit_pipeline import __version__
from vit_pipeline.errors import PipelineError
from vit_pipeline.fsutil import atomic_path
from vit_pipeline.progress import quiet, task

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext
    from vit_pipeline.data import Splits

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = contract.INPUT_NAME, contract.OUTPUT_NAME
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


def build_metadata(
    class_names: list[str],
    input_shape: tuple[int, int, int],
    dataset: str = "",
    test_accuracy: float | None = None,
    run_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (``vit_consumer.contract`` states them)."""
    return contract.build_metadata(class_names, input_shape, producer_version=__version__, dataset=dataset,
                                   test_accuracy=test_accuracy, run_id=run_id, extra=extra)  # fmt: skip


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


def onnx_scores(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None,
                reference: np.ndarray | None = None, batch_size: int = 64, shown=None) -> dict[str, float]:  # fmt: skip
    """An ONNX file's top-1/top-5 on labelled images and its agreement with reference logits (CPU)."""
    from vit_pipeline.evaluate import scores

    return scores(run_onnx(ort_session(path), images, batch_size, shown), labels, reference)


def run_onnx(session, images: np.ndarray, batch_size: int, shown=None) -> np.ndarray:
    """Logits of ``images`` in batches; ``shown`` (a progress tracker) advances per image."""

    return contract.run_batches(session, images, batch_size, (shown or quiet()).advance)


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

    from vit_pipeline.evaluate import scores

    session = ort_session(onnx_path)
    per_batch: dict[str, dict[str, float]] = {}
    with task(
        f"Parity: Keras vs ONNX Runtime, {Path(onnx_path).name}", len(images) * len(batch_sizes)
    ) as shown:
        for bs in batch_sizes:
            logits = run_onnx(session, images, bs, shown)
            per_batch[str(bs)] = {
                "max_abs_diff": float(np.abs(logits - keras_logits).max()),
                "top1_agreement": scores(logits, reference=keras_logits)["top1_agreement"],
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


# --------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ExportResult:
    """What the export stage hands on: the served file, the plain export, and what their gates measured."""

    path: str  # the served file (``serve_variant``)
    fp32_path: str  # the plain tf2onnx export every variant is built from
    variant: str
    export_seconds: float
    opset: int
    size_bytes: int
    ops: list[str]
    fusions: dict[str, int]
    candidates: dict[str, dict[str, Any]]  # the serving candidates that passed their gate
    parity: dict[str, float]  # worst max_abs_diff and top1_agreement over the strict files; num_images

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(ctx: StageContext, data_path: str, model_path: str, test_accuracy: float,
        temperature: float = 1.0) -> ExportResult:  # fmt: skip
    """The export stage: exports to ONNX, builds the serving candidates once, and gates them all.

    The plain export and the served file (the fused graph by default) must pass
    the strict parity gate; the figures are logged before the gate decides, so a
    failure is visible in MLflow. Each other serving candidate (``serve_candidates``,
    e.g. int8-static) must keep ``candidate_min_agreement`` top-1 agreement with
    Keras on real test images, or it is dropped (its figures logged). The ones that
    pass are listed in the candidates manifest (``vit_consumer.contract``) beside the
    served file; the register stage registers them with it.

    ``temperature`` (the calibration stage's) goes into the files' metadata, for the
    probabilities a consumer returns; the logits, and so parity, do not depend on it.

    Raises:
        ExportError: a strict gate failed (nothing may be registered).
    """
    from vit_pipeline.data import Splits
    from vit_pipeline.evaluate import predict_logits
    from vit_pipeline.model import load_model
    from vit_pipeline.variants import build_variants, calibration_sample

    cfg = ctx.cfg
    splits = Splits.load(data_path)
    model = load_model(model_path)
    metadata = build_metadata(
        splits.class_names, splits.input_shape, dataset=cfg.dataset_tag, test_accuracy=test_accuracy,
        run_id=ctx.run_id, extra={"data_digest": splits.digest(), "image_size": cfg.image_size,
                                  "patch_size": cfg.patch_size, "opset": cfg.onnx_opset,
                                  contract.META_TEMPERATURE: f"{temperature:.6g}"},
    )  # fmt: skip
    out = ctx.work_dir
    info = export_onnx(model, out / "model.onnx", metadata, cfg.onnx_opset)
    candidates = [v for v in cfg.serve_candidate_list if v != cfg.serve_variant]
    calibration = calibration_sample(splits.x_train, cfg.int8_calibration_images, cfg.seed)
    fusions: dict[str, int] = {}
    paths = {k: str(v) for k, v in build_variants(
        info["path"], out, ["fp32", cfg.serve_variant, *candidates], calibration=calibration,
        fusions=fusions).items()}  # fmt: skip
    # Keras logits once, for the parity images, the (larger) candidate gate and the serving gate alike.
    gate_images = min(cfg.serve_gate_images, GATE_BYTES // max(int(np.prod(splits.input_shape)), 1))
    all_logits = predict_logits(
        model, splits.x_test[: max(cfg.parity_images, cfg.candidate_images if candidates else 0, gate_images)]
    )
    images = splits.x_test[: cfg.parity_images]
    strict = {name: paths[name] for name in ("fp32", cfg.serve_variant)}
    reports = {name: check_parity(all_logits[: len(images)], path, images, (1, 64), cfg.parity_tolerance)
               for name, path in strict.items()}  # fmt: skip
    gated = gate_candidates(cfg, all_logits, splits, {v: paths[v] for v in candidates})
    _log_gates(ctx, info, reports, gated, fusions, Path(paths[cfg.serve_variant]).stat().st_size)
    for report in reports.values():
        parity_gate(report)
    passed = {n: c for n, c in gated.items() if c["passed"]}
    manifest = {n: {**{k: v for k, v in c.items() if k != "path"}, "file": Path(c["path"]).name}
                for n, c in passed.items()}  # fmt: skip
    gate = write_serving_gate(out, splits.x_test[:gate_images], all_logits[:gate_images])
    contract.CandidatesManifest(cfg.serve_variant, cfg.candidate_min_agreement, manifest, gate).write(out)
    return ExportResult(
        path=paths[cfg.serve_variant], fp32_path=paths["fp32"], variant=cfg.serve_variant,
        export_seconds=info["export_seconds"], opset=info["opset"], size_bytes=info["size_bytes"], ops=info["ops"],
        fusions=fusions, candidates=passed,
        parity={"max_abs_diff": max(r.max_abs_diff for r in reports.values()),
                "top1_agreement": min(r.top1_agreement for r in reports.values()),
                "num_images": reports[cfg.serve_variant].num_images},
    )  # fmt: skip


def _log_gates(ctx: StageContext, info: dict, reports: dict[str, ParityReport], gated: dict[str, dict],
               fusions: dict[str, int], served_bytes: int) -> None:  # fmt: skip
    """Every gate's figures as metrics, the whole report as ``export/parity.json``, the verdicts as tags.

    ``onnx_size_mb`` is the plain export's (MiB), ``served_onnx_size_mb`` the registered file's."""
    metrics = {"export_seconds": info["export_seconds"], "onnx_size_mb": info["size_bytes"] / 2**20,
               "served_onnx_size_mb": served_bytes / 2**20}  # fmt: skip
    for name, report in reports.items():
        prefix = "parity" if name == "fp32" else f"parity_{name}"
        metrics[f"{prefix}_max_abs_diff"] = report.max_abs_diff
        metrics[f"{prefix}_top1_agreement"] = report.top1_agreement
    for name, c in gated.items():
        key = name.replace("-", "_")
        metrics |= {f"candidate_{key}_top1_agreement": c["top1_agreement"],
                    f"candidate_{key}_test_accuracy": c["test_accuracy"], f"candidate_{key}_size_mb": c["size_mb"]}  # fmt: skip
    ctx.log.metrics(metrics)
    ctx.log.dict({name: r.to_dict() for name, r in reports.items()}
                 | {"ops": info["ops"], "fusions": fusions, "candidates": gated}, "export/parity.json")  # fmt: skip
    ctx.log.tags({
        "export.parity": "passed" if all(r.passed for r in reports.values()) else "failed",
        "export.serve_variant": ctx.cfg.serve_variant,
        "export.candidates": ",".join(n for n, c in gated.items() if c["passed"]) or "none",
    })  # fmt: skip


GATE_BYTES = 8 * 2**20  # pixels of the serving gate's images registered with a model (uint8)
GATE_FILE = "serving_gate.npz"


def write_serving_gate(folder: Path, images: np.ndarray, logits: np.ndarray) -> dict[str, Any] | None:
    """Real test images and the Keras logits on them, beside the candidates (``contract.CandidatesManifest.gate``).

    The consumer runs the agreement gate again with them on the machine that serves, for what only
    that machine decides: OpenVINO's precision (bf16 where the CPU has it) and its int8 kernels.
    """
    if not len(images):
        return None
    path = Path(folder) / GATE_FILE
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=np.asarray(images), logits=np.asarray(logits, np.float32))
    return {"file": GATE_FILE, "images": int(len(images)), "reference": "keras fp32"}


def gate_candidates(cfg, keras_logits: np.ndarray, splits: Splits, paths: dict[str, str]) -> dict[str, dict]:
    """Top-1 agreement with Keras and test accuracy of each serving candidate on real test images."""
    from vit_pipeline.evaluate import scores

    if not paths:
        return {}
    images, labels = splits.x_test[: cfg.candidate_images], splits.y_test[: cfg.candidate_images]
    reference = keras_logits[: len(images)]
    keras_accuracy = scores(reference, labels)["top1"]
    out = {}
    for name, path in paths.items():
        with task(f"Candidate gate: {name} vs Keras", len(images)) as shown:
            score = onnx_scores(path, images, labels, reference, shown=shown)
        agreement = score["top1_agreement"]
        out[name] = {
            "path": path, "top1_agreement": agreement, "test_accuracy": score["top1"],
            "keras_test_accuracy": keras_accuracy, "images": int(len(labels)),
            "size_mb": Path(path).stat().st_size / 2**20, "passed": agreement >= cfg.candidate_min_agreement,
        }  # fmt: skip
        log.info("Candidate %s: agreement %.4f with Keras on %d test images (%s)", name, agreement, len(labels),
                 "passed" if out[name]["passed"] else f"below {cfg.candidate_min_agreement}")  # fmt: skip
    return out


def registered_variants(cfg, folder: str | Path) -> tuple[str, ...]:
    """The served variant and the candidates the export listed beside it in ``folder``."""
    manifest = contract.CandidatesManifest.find(folder)
    return (cfg.serve_variant, *(manifest.candidates if manifest else ()))
