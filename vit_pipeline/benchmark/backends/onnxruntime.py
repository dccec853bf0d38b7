"""ONNX Runtime, one session per (model file, provider).

On CUDA and TensorRT the input is bound on the device once with IO binding, so
host copies are not timed; TensorRT keeps an engine cache. The precision is read
from the graph ONNX Runtime really runs (after its own fusions): int8 when its
GEMMs are integer kernels (``MatMulIntegerToFloat``, ``QLinearMatMul``, ...).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from vit_consumer import contract

from vit_pipeline.benchmark.backends import batched

PROVIDER_ALIASES = {"cpu": contract.CPU, "cuda": contract.CUDA, "tensorrt": contract.TENSORRT}
GPU_PROVIDERS = (contract.TENSORRT, contract.CUDA)
INT8_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QAttention",
            "DynamicQuantizeMatMul", "QLinearConv", "ConvInteger"}  # fmt: skip


def session(path: str | Path, providers: list[Any] | None = None, threads: int | None = None,
            optimized_path: str | None = None):  # fmt: skip
    """An ``InferenceSession`` (CPU unless told), optionally saving the graph it really runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
        # Saving the optimised graph makes ORT warn that it is hardware specific: this copy is only
        # read to learn which kernels run, never served.
        options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or [contract.CPU])


def runtime_precision(path: str | Path) -> tuple[str, list[str]]:
    """(precision, integer op types) of the graph ONNX Runtime's CPU provider runs for ``path``."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "runtime.onnx")
        session(path, optimized_path=out)
        model = onnx.load(out, load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    int_ops = sorted(ops & INT8_OPS)
    if int_ops:
        return "int8", int_ops
    halves = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    return ("fp16" if halves else "fp32"), []


class OrtBackend:
    """One ONNX Runtime session; reports the providers it really uses.

    Args:
        path: The ONNX file.
        provider: Requested provider (full name); CPU is always the fallback.
        variant: Name of the model variant, for the report.
        cache_dir: TensorRT engine cache directory.
        threads: intra-op threads (None: ONNX Runtime's default).
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, provider: str, variant: str, cache_dir: str | None = None,
                 threads: int | None = None):  # fmt: skip
        providers: list[Any] = []
        if provider == contract.TENSORRT:
            trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir or "trt-cache",
                   "trt_fp16_enable": variant == "fp16"}  # fmt: skip
            providers.append((provider, trt))
            providers.append(contract.CUDA)
        elif provider != contract.CPU:
            providers.append(provider)
        providers.append(contract.CPU)
        self.path = Path(path)
        self.session = session(path, providers, threads)
        self.providers_used = self.session.get_providers()
        # Name the row by what really runs, never by what was asked for.
        self.provider = self.providers_used[0]
        self.variant = variant
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.on_gpu = self.provider in GPU_PROVIDERS

    @functools.cached_property
    def _runtime(self) -> tuple[str, list[str]]:
        # Read on first use: the probe opens a second session, which a memory measurement must not hold.
        if self.on_gpu:
            return ("fp16" if self.variant == "fp16" else "fp32"), []
        return runtime_precision(self.path)

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: what ONNX Runtime really runs (its optimised graph), not the file's name."""
        return self._runtime[0]

    @property
    def integer_ops(self) -> list[str]:
        return self._runtime[1]

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.on_gpu:
            feed = {self.input: batch}
            return lambda: self.session.run([self.output], feed)
        import onnxruntime as ort

        # IO binding: the input lives on the GPU before timing; outputs stay there.
        binding = self.session.io_binding()
        device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        binding.bind_ortvalue_input(self.input, device_input)
        binding.bind_output(self.output, "cuda")

        def run():
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return batched(lambda x: self.session.run([self.output], {self.input: x})[0], images, batch_size)


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Providers to try: the requested ones, or every one this build offers.

    Whether a provider really works is only known once a session runs; rows are
    labelled with ``session.get_providers()[0]``, so a CUDA request that falls
    back to CPU shows up as CPU (and is dropped as a duplicate).
    """
    if requested:
        from vit_pipeline.errors import ConfigError

        names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
        # A name ONNX Runtime does not know measured nothing and exited 0 with an empty table.
        bad = set(contract.unknown_providers(names))
        if unknown := [p for p, name in zip(requested, names, strict=True) if name in bad]:
            raise ConfigError(f"Expected providers {', '.join(PROVIDER_ALIASES)} or ONNX Runtime's names (such as "
                              f"OpenVINOExecutionProvider). Received: {', '.join(unknown)}")  # fmt: skip
        return names
    # Every GPU provider where an NVIDIA device is visible (the benchmark compares them), then CPU.
    return contract.default_providers(GPU_PROVIDERS, use_env=False)


def probe_provider(path: str | Path, provider: str) -> str:
    """The provider a session requesting ``provider`` really runs on."""
    fallback = [] if provider == contract.CPU else [contract.CPU]
    return session(path, [provider, *fallback]).get_providers()[0]
