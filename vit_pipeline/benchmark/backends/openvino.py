"""OpenVINO on the CPU, reading the same ONNX file (optional: ``pip install -e '.[openvino]'``).

Two settings are measured: OpenVINO as it comes (its CPU plugin picks the
inference precision: bf16 where the CPU has AVX512-BF16 or AMX, f32 otherwise)
and with ``INFERENCE_PRECISION_HINT=f32`` (equal precision with ONNX Runtime's
fp32 rows). The precision reported is the one the compiled model says it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from vit_consumer.engines import PRECISION_NAMES, type_name

from vit_pipeline.benchmark.backends import batched
from vit_pipeline.benchmark.report import OV_DEFAULT, OV_F32


def available() -> tuple[bool, str]:
    """(importable, why not / version)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install -e '.[openvino]'"
    return True, ov.get_version()


def _has_int8_weights(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("DequantizeLinear", "QLinearMatMul", "MatMulInteger") for n in model.graph.node)


class OpenVinoBackend:
    """One compiled OpenVINO model on the CPU device.

    Args:
        path: The ONNX file.
        variant: Name of the model variant, for the report.
        f32: Force ``INFERENCE_PRECISION_HINT=f32`` (otherwise OpenVINO's default).
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default).
    """

    backend = "openvino"

    def __init__(self, path: str | Path, variant: str, f32: bool = False, threads: int | None = None):
        import openvino as ov

        config: dict[str, Any] = {}  # as it comes: a user who installs OpenVINO and changes nothing
        if f32:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.path = Path(path)
        self.provider = OV_F32 if f32 else OV_DEFAULT
        self.variant = variant
        hint = type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        precision = PRECISION_NAMES.get(hint.lower(), hint.lower())
        # QDQ files run their GEMMs in int8 (LPT); the hint only covers the rest.
        self.precision = "int8" if _has_int8_weights(Path(path)) else precision
        self.providers_used = [f"openvino {ov.get_version()} CPU ({hint})"]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return lambda: self.request.infer({0: batch})

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return batched(self._run, images, batch_size)
