"""Model variants built from the exported ONNX file, once, beside the export.

* ``fp32``: the plain tf2onnx export (portable: any ONNX runtime).
* ``optimized``: the fused fp32 graph (``vit_pipeline.optimize``).
* ``int8``: dynamic quantisation of the fused graph (int8 weights, activations
  quantised at run time), classifier head in fp32.
* ``int8-static``: static QDQ quantisation of the fused graph, calibrated on real
  training images: per-channel int8 weights and uint8 activations for every
  MatMul/Gemm with a constant weight, the classifier head included. ONNX
  Runtime turns QDQ pairs into integer kernels (VNNI/AMX where the CPU has them);
  OpenVINO reads the same file as an int8 model.
* ``fp16``: fp16 weights and compute, fp32 inputs and outputs (GPUs only).

The benchmark, the registry and the consumer use these files as built here: what
is timed is what is registered and served.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from vit_pipeline.fsutil import atomic_path, scratch_root
from vit_pipeline.progress import quiet

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "optimized", "int8", "int8-static", "fp16")
CPU_ONLY = {"int8", "int8-static"}  # integer kernels are CPU kernels here
GPU_ONLY = {"fp16"}  # fp16 on a CPU is slower than fp32


def file_name(variant: str) -> str:
    return "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"


def classifier_head(model) -> list[str]:
    """Names of the MatMul/Gemm nodes after the last LayerNormalization (the head).

    The seed's head multiplies the flattened 144x64 sequence (9,216 inputs) by a
    2,048-wide matrix; dynamic int8 rounding summed over 9,216 terms flipped 5% of
    top-1 predictions of a CIFAR-100 model here, against 0.75% with the head in
    fp32. Graphs without LayerNormalization get an empty list.
    """
    nodes = list(model.graph.node)
    last_ln = max((i for i, n in enumerate(nodes) if n.op_type == "LayerNormalization"), default=None)
    if last_ln is None:
        return []
    return [n.name for n in nodes[last_ln + 1 :] if n.op_type in ("MatMul", "Gemm")]


def weight_gemms(model) -> list[str]:
    """MatMul/Gemm nodes whose second input is a constant weight (not attention's Q·Kᵀ)."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants]  # fmt: skip


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantiser logs advice ("consider pre-processing") as root WARNINGs; not ours to act on."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8: int8 weights (per channel), activations quantised at run time; head in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    head = classifier_head(onnx.load(str(src)))
    with atomic_path(dst) as tmp, _quiet_quantizer():
        quantize_dynamic(
            str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm", "Attention"], nodes_to_exclude=head,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )  # fmt: skip
    return Path(dst)


class _Calibration:
    """Feeds real images to ONNX Runtime's calibrator in fixed batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 32, shown=None):
        self.batches = [np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)
                        for i in range(0, len(images), batch_size)]  # fmt: skip
        self.input_name = input_name
        self.position = 0
        self.shown = shown or quiet()  # a progress tracker, advanced per image handed out

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        batch = self.batches[self.position - 1]
        self.shown.advance(len(batch))
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0


def calibration_sample(x_train: np.ndarray, n: int = 256, seed: int = 0) -> np.ndarray:
    """A fixed random sample of training images (never test images) for int8 calibration."""
    rng = np.random.default_rng(seed)
    return x_train[np.sort(rng.choice(len(x_train), min(n, len(x_train)), replace=False))]


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: np.ndarray) -> Path:
    """Static QDQ int8 calibrated on ``calibration`` (real training images, raw pixels).

    Per-channel symmetric int8 weights, asymmetric uint8 activations with
    min/max ranges from the calibration pass; only GEMMs with constant weights are
    quantised (attention's Q·Kᵀ and P·V stay fp32, as do LayerNorm, Softmax and
    GELU), the classifier head included.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("Expected calibration images for int8-static. Received: 0 images")
    model = onnx.load(str(src))
    nodes = weight_gemms(model)
    input_name = model.graph.input[0].name
    from vit_pipeline.progress import task

    shown = task(
        f"int8 calibration: {len(nodes)} GEMMs on {len(calibration)} training images", len(calibration)
    )
    with (
        shown as tracker,
        tempfile.TemporaryDirectory(dir=scratch_root()) as work,
        atomic_path(dst) as tmp,
        _quiet_quantizer(),
    ):
        # Symbolic shape inference knows ONNX Runtime's contrib ops (Gelu, Attention), so
        # the quantiser sees every tensor's type; the graph itself is left as it is.
        inferred = Path(work) / "inferred.onnx"
        quant_pre_process(str(src), str(inferred), skip_optimization=True, skip_onnx_shape=False,
                          skip_symbolic_shape=False)  # fmt: skip
        quantize_static(
            str(inferred), str(tmp), _Calibration(calibration, input_name, shown=tracker), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )  # fmt: skip
    log.info("int8-static: %d GEMMs quantised, calibrated on %d images", len(nodes), len(calibration))
    return Path(dst)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (for GPUs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return Path(dst)


def build_variants(
    fp32_path: str | Path,
    out_dir: str | Path,
    names: list[str] | tuple[str, ...],
    gpu: bool = False,
    calibration: np.ndarray | None = None,
    fusions: dict[str, int] | None = None,
) -> dict[str, Path]:
    """Writes the requested variants into ``out_dir``; returns name -> path.

    ``int8-static`` needs ``calibration`` images and is skipped (with a log line)
    without them; ``fp16`` is made only when ``gpu``. ``fusions``, if given, receives
    the fused graph's rewrite counts.
    """
    import onnx

    from vit_pipeline.optimize import optimize

    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise ValueError(f"Expected variants from {VARIANTS}. Received: {sorted(unknown)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if "fp32" in names:
        paths["fp32"] = Path(fp32_path)
    optimized_path = out_dir / file_name("optimized")
    if set(names) - {"fp32"}:
        from vit_pipeline.progress import task

        with task("Graph fusions for ONNX Runtime (LayerNorm, GELU, attention)"):
            optimized, report = optimize(onnx.load(str(fp32_path)))
        with atomic_path(optimized_path) as tmp:
            onnx.save(optimized, str(tmp))
        log.info("Optimised graph: %s", report.to_dict())
        if fusions is not None:  # the caller's record of what the rewrites did
            fusions.update(report.to_dict())
    if "optimized" in names:
        paths["optimized"] = optimized_path
    builders = {
        "int8": lambda dst: quantize_int8(optimized_path, dst),
        "int8-static": lambda dst: quantize_static_int8(optimized_path, dst, calibration),
        "fp16": lambda dst: convert_fp16(optimized_path, dst),
    }
    for name, build in builders.items():
        if name not in names or (name == "fp16" and not gpu):
            continue
        if name == "int8-static" and calibration is None:
            log.info("int8-static skipped: no calibration images")
            continue
        paths[name] = build(out_dir / file_name(name))
    return paths
