"""The environment snapshot of a report: CPU, ISA, cores, library versions, providers."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

# The instruction-set features that decide which kernels run (and so the rooflines).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_bf16", "amx_int8")  # fmt: skip


def environment(threads: int | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__}
    for mod in ("onnx", "tensorflow", "keras", "tf2onnx", "openvino"):
        with contextlib.suppress(ImportError):  # optional in a consumer-only environment
            versions[mod] = __import__(mod).__version__
    return {
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "ort_intra_op_threads": threads or "default",
        "platform": platform.platform(),
        "versions": versions,
        "providers_available": ort.get_available_providers(),
        "gpu": gpu_name(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_isa() -> list[str]:
    for line in _cpuinfo():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in ISA_FLAGS if f in flags]
    return []


def gpu_name() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
