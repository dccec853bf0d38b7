"""Inference benchmark: Keras, ONNX Runtime (per provider) and OpenVINO, per variant and batch size.

Laid out like optimum-benchmark: ``report`` (the typed report and its loader),
``backends/`` (one module per engine behind one protocol), ``scenario`` (what is
timed, in alternating rounds), ``roofline`` (GEMM peaks per precision and model
FLOPs), ``environment``, ``memory`` (peak RSS per backend in a child process) and
``run`` (the entry point). Variants are built by ``vit_pipeline.variants``.
"""

from vit_pipeline.benchmark.backends.keras import KerasBackend
from vit_pipeline.benchmark.backends.onnxruntime import OrtBackend, probe_provider, resolve_providers
from vit_pipeline.benchmark.report import BenchmarkReport, BenchmarkResult, LatencyStats
from vit_pipeline.benchmark.roofline import count_gflop_per_image, sgemm_roofline
from vit_pipeline.benchmark.run import (
    MIN_AGREEMENT,
    benchmark_files,
    choose_served,
    fit_to_input,
    fresh_keras_model,
    plot_throughput,
    random_images,
    run_benchmark,
)
from vit_pipeline.benchmark.scenario import Scenario, measure

__all__ = [
    "MIN_AGREEMENT",
    "BenchmarkReport",
    "BenchmarkResult",
    "KerasBackend",
    "LatencyStats",
    "OrtBackend",
    "Scenario",
    "benchmark_files",
    "choose_served",
    "count_gflop_per_image",
    "fit_to_input",
    "fresh_keras_model",
    "measure",
    "plot_throughput",
    "probe_provider",
    "random_images",
    "resolve_providers",
    "run_benchmark",
    "sgemm_roofline",
]
