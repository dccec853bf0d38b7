"""Peak memory per backend, each in its own child process so the figures do not mix.

The child imports the engine, records its resident set size (RSS), builds the
backend, runs the largest batch a few times and reports the peak RSS
(``VmHWM``) and the baseline before the model was loaded. Run as
``python -m vit_pipeline.benchmark.memory '<spec json>'``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline.benchmark.child import report, run_child

MARKER = "MEMORY "


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak RSS of this process image: VmHWM. (``ru_maxrss`` survives execve on Linux, so a
    child started from a big parent would report the parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(spec: dict[str, Any]):
    """The backend a spec describes (imports the engine)."""
    kind = spec["backend"]
    if kind == "onnxruntime":
        from vit_pipeline.benchmark.backends.onnxruntime import OrtBackend

        return OrtBackend(spec["path"], spec["provider"], spec["variant"])
    if kind == "openvino":
        from vit_pipeline.benchmark.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(spec["path"], spec["variant"], f32=spec.get("f32", False))
    if kind == "keras":
        from vit_pipeline.benchmark.backends.keras import KerasBackend
        from vit_pipeline.model import load_model

        return KerasBackend(load_model(spec["path"]), xla=spec.get("xla", False))
    raise ValueError(f"Unknown backend {kind!r}")


def _import_engine(kind: str) -> None:
    __import__({"onnxruntime": "onnxruntime", "openvino": "openvino", "keras": "tensorflow"}[kind])


def child(spec: dict[str, Any]) -> dict[str, float]:
    _import_engine(spec["backend"])
    before = current_rss_mib()
    backend = build(spec)
    shape = spec["input_shape"]
    batch = np.random.default_rng(0).uniform(0, 255, (spec["batch_size"], *shape)).astype(np.float32)
    run = backend.prepare(batch)
    for _ in range(spec.get("runs", 5)):
        run()
    return {"peak_rss_mib": peak_rss_mib(), "engine_rss_mib": before, "batch_size": spec["batch_size"]}


def measure_memory(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Runs ``child(spec)`` in a fresh Python; returns its figures or ``{"error": ...}``."""
    return run_child(["-m", "vit_pipeline.benchmark.memory", json.dumps(spec)], MARKER, timeout)


if __name__ == "__main__":
    report(MARKER, child(json.loads(sys.argv[1])))
