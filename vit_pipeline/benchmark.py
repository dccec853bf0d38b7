"""Inference benchmark: Keras vs ONNX Runtime providers, batch sizes and variants.

Backends (how a batch is run) are separate from the scenario (what is timed):

* ``KerasBackend``: the model in a ``tf.function`` (the honest TensorFlow baseline;
  ``model.predict`` adds ~40 ms of per-call overhead), optionally XLA-compiled.
* ``OrtBackend``: one ONNX Runtime session per (variant, provider). On CUDA and
  TensorRT the input is bound on the device once with IO binding, so host copies
  are not timed; TensorRT keeps an engine cache.

The scenario warms each cell up, then times runs until both a minimum count and
a minimum duration are reached; the input arrays are prepared before timing, so
data loading is never in the numbers. Cells are measured in alternating rounds
so that a noisy machine slows every cell alike.

The report (``BenchmarkReport``) is the stable interface: JSON with top-level
``environment`` and ``results``; each result has ``backend``, ``provider``,
``variant``, ``batch_size``, ``latency_ms`` (``mean``, ``p50``, ``p90``, ``p95``,
``p99``, ``stdev``), ``throughput_ips`` and, where measured, ``top1``, ``top5``,
``top1_agreement``, ``gflops_per_s`` and ``roofline_fraction``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_pipeline.fsutil import atomic_path, write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


# ------------------------------------------------------------------ the report
@dataclass
class LatencyStats:
    """Latency of one batch, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    stdev: float

    @classmethod
    def from_seconds(cls, samples: list[float]) -> LatencyStats:
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p95), float(p99),
                   float(ms.std(ddof=1)) if len(ms) > 1 else 0.0)  # fmt: skip


@dataclass
class BenchmarkResult:
    """One cell of the matrix: a backend, provider, variant and batch size."""

    backend: str  # "keras" or "onnxruntime"
    provider: str  # ONNX Runtime provider really used, or "tensorflow" / "tensorflow-xla"
    variant: str  # "fp32", "optimized", "int8", "fp16"
    batch_size: int
    latency_ms: LatencyStats
    throughput_ips: float  # images per second = batch_size * 1000 / mean latency
    runs: int
    top1: float | None = None
    top5: float | None = None
    top1_agreement: float | None = None  # with the fp32 ONNX Runtime (CPU) outputs
    gflops_per_s: float | None = None
    roofline_fraction: float | None = None
    providers_used: list[str] = field(default_factory=list)


@dataclass
class BenchmarkReport:
    """Environment snapshot, roofline and every measured cell."""

    environment: dict[str, Any]
    results: list[BenchmarkResult]
    model: dict[str, Any] = field(default_factory=dict)
    roofline: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(self.to_dict(), indent=2))

    def baseline(self, batch_size: int) -> BenchmarkResult | None:
        """The fastest Keras row at this batch size."""
        rows = [r for r in self.results if r.backend == "keras" and r.batch_size == batch_size]
        return max(rows, key=lambda r: r.throughput_ips, default=None)

    def find(self, variant: str, provider: str, batch_size: int) -> BenchmarkResult | None:
        return next(
            (r for r in self.results if r.backend == "onnxruntime" and r.variant == variant
             and r.provider == provider and r.batch_size == batch_size), None,
        )  # fmt: skip

    def to_markdown(self) -> str:
        """A table with ratios to the Keras baseline at the same batch size."""
        env = self.environment
        lines = [
            f"Model: {self.model.get('name', '?')} ({self.model.get('gflop_per_image', 0):.3f} GFLOP/image); "
            f"CPU: {env.get('cpu_model')} x{env.get('cpu_count')}; onnxruntime {env.get('versions', {}).get('onnxruntime')}, "
            f"tensorflow {env.get('versions', {}).get('tensorflow', '-')}",
            f"sgemm roofline measured in this run: {self.roofline.get('gflops', 0):.0f} GFLOP/s "
            f"({self.roofline.get('method', '')})",
            "",
            "| backend | provider | variant | batch | mean ms | p50 | p90 | p99 | img/s | vs Keras | "
            "GFLOP/s | % roofline | top-1 | top-5 | agreement |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            self.results, key=lambda r: (r.batch_size, r.backend != "keras", r.provider, r.variant)
        ):
            base = self.baseline(r.batch_size)
            ratio = f"{r.throughput_ips / base.throughput_ips:.2f}x" if base else "-"
            lat = r.latency_ms
            lines.append(
                f"| {r.backend} | {r.provider} | {r.variant} | {r.batch_size} | {lat.mean:.2f} | {lat.p50:.2f} | "
                f"{lat.p90:.2f} | {lat.p99:.2f} | {r.throughput_ips:.1f} | {ratio} | "
                f"{_fmt(r.gflops_per_s, '.1f')} | {_fmt(r.roofline_fraction, '.0%')} | {_fmt(r.top1, '.4f')} | "
                f"{_fmt(r.top5, '.4f')} | {_fmt(r.top1_agreement, '.2%')} |"
            )
        return "\n".join(lines) + "\n"

    def ratios(self) -> list[str]:
        """Human-readable speed ratios measured side by side in this run."""
        out = []
        for bs in sorted({r.batch_size for r in self.results}):
            base = self.baseline(bs)
            cpu = "CPUExecutionProvider"
            fp32, opt, int8 = (self.find(v, cpu, bs) for v in ("fp32", "optimized", "int8"))
            if base:
                for row in (fp32, opt, int8):
                    if row:
                        out.append(
                            f"batch {bs}: ORT {row.variant} / Keras = {row.throughput_ips / base.throughput_ips:.2f}x"
                        )
            if int8 and opt:
                out.append(
                    f"batch {bs}: int8 / ORT optimized fp32 = {int8.throughput_ips / opt.throughput_ips:.2f}x"
                )
            if int8 and fp32:
                out.append(
                    f"batch {bs}: int8 / ORT fp32 as exported = {int8.throughput_ips / fp32.throughput_ips:.2f}x"
                )
        return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------- environment
def environment(threads: int | None = None) -> dict[str, Any]:
    """CPU, cores, threads, library versions and available providers."""
    import onnxruntime as ort

    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__}
    for mod in ("onnx", "tensorflow", "keras", "tf2onnx"):
        with contextlib.suppress(ImportError):  # optional in a consumer-only environment
            versions[mod] = __import__(mod).__version__
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ort_intra_op_threads": threads or "default",
        "platform": platform.platform(),
        "versions": versions,
        "providers_available": ort.get_available_providers(),
        "gpu": _gpu_name(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> str | None:
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


def sgemm_roofline(n: int = 1536, seconds: float = 2.0) -> dict[str, Any]:
    """Dense fp32 matmul throughput of ONNX Runtime's MLAS here: the ceiling to compare with."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    feed = {"a": a, "b": a}
    samples = measure(lambda: session.run(None, feed), warmup=2, min_runs=3, min_seconds=seconds)
    best = min(samples)
    return {
        "gflops": 2 * n**3 / best / 1e9,
        "method": f"ONNX Runtime MatMul {n}x{n}x{n} fp32, best of {len(samples)}",
    }


# ------------------------------------------------------------------ timing
def measure(
    fn: Callable[[], Any], warmup: int = 3, min_runs: int = 10, min_seconds: float = 1.0
) -> list[float]:
    """Warm up, then time ``fn`` until ``min_runs`` and ``min_seconds`` are both reached."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


# ---------------------------------------------------------------- backends
class KerasBackend:
    """Runs a Keras model in a ``tf.function`` (optionally XLA-compiled), inference mode."""

    backend = "keras"

    def __init__(self, model, xla: bool = False):
        import tensorflow as tf

        self.model = model
        self.provider = "tensorflow-xla" if xla else "tensorflow"
        self.variant = "fp32"
        self._fn = tf.function(lambda x: model(x, training=False), jit_compile=xla, reduce_retracing=True)
        self.providers_used = ["tensorflow"]

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        import tensorflow as tf

        x = tf.constant(batch, tf.float32)  # on the default device before timing
        return lambda: self._fn(x).numpy()

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        import tensorflow as tf

        return np.concatenate([self._fn(tf.constant(images[i : i + batch_size], tf.float32)).numpy()
                               for i in range(0, len(images), batch_size)])  # fmt: skip


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
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers: list[Any] = []
        if provider == "TensorrtExecutionProvider":
            trt = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir or "trt-cache",
                   "trt_fp16_enable": variant == "fp16"}  # fmt: skip
            providers.append((provider, trt))
            providers.append("CUDAExecutionProvider")
        elif provider != "CPUExecutionProvider":
            providers.append(provider)
        providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers_used = self.session.get_providers()
        # Name the row by what really runs, never by what was asked for.
        self.provider = self.providers_used[0]
        self.variant = variant
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.on_gpu = self.provider in GPU_PROVIDERS

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
        return np.concatenate([
            self.session.run([self.output], {self.input: images[i : i + batch_size].astype(np.float32)})[0]
            for i in range(0, len(images), batch_size)
        ])  # fmt: skip


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Providers to try: the requested ones, or every one this build offers.

    Whether a provider really works is only known once a session runs; rows are
    labelled with ``session.get_providers()[0]``, so a CUDA request that falls
    back to CPU shows up as CPU (and is dropped as a duplicate).
    """
    import onnxruntime as ort

    if requested:
        return [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    # onnxruntime-gpu lists CUDA and TensorRT even without a GPU; probing them there
    # only prints pages of load errors. Try them where an NVIDIA device exists.
    gpu = Path("/dev/nvidiactl").exists()
    wanted = (*(GPU_PROVIDERS if gpu else ()), "CPUExecutionProvider")
    return [p for p in wanted if p in ort.get_available_providers()]


def probe_provider(path: str | Path, provider: str) -> str:
    """The provider a session requesting ``provider`` really runs on."""
    return OrtBackend(path, provider, "probe").provider


# ---------------------------------------------------------------- variants
def make_variants(fp32_path: str | Path, out_dir: str | Path, names: list[str], gpu: bool) -> dict[str, Path]:
    """Writes the requested model variants next to each other; returns name -> path.

    ``int8`` is CPU-oriented dynamic quantisation of the optimised graph; ``fp16``
    is made only when a GPU provider is present (fp16 on this CPU is slower).
    """
    import onnx

    from vit_pipeline.optimize import optimize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if "fp32" in names:
        paths["fp32"] = Path(fp32_path)
    optimized_path = out_dir / "optimized.onnx"
    if {"optimized", "int8", "fp16"} & set(names):
        optimized, report = optimize(onnx.load(str(fp32_path)))
        with atomic_path(optimized_path) as tmp:
            onnx.save(optimized, str(tmp))
        log.info("Optimised graph: %s", report.to_dict())
        if "optimized" in names:
            paths["optimized"] = optimized_path
    if "int8" in names:
        paths["int8"] = quantize_int8(optimized_path, out_dir / "int8.onnx")
    if "fp16" in names and gpu:
        paths["fp16"] = convert_fp16(optimized_path, out_dir / "fp16.onnx")
    return paths


def classifier_head(model) -> list[str]:
    """Names of the MatMul/Gemm nodes after the last LayerNormalization (the head).

    The seed's head multiplies the flattened 144x64 sequence (9,216 inputs) by a
    2,048-wide matrix; int8 rounding summed over 9,216 terms flipped 5% of top-1
    predictions of a CIFAR-100 model here, against 0.75% with the head in fp32.
    Graphs without LayerNormalization get an empty list (everything quantised).
    """
    nodes = list(model.graph.node)
    last_ln = max((i for i, n in enumerate(nodes) if n.op_type == "LayerNormalization"), default=None)
    if last_ln is None:
        return []
    return [n.name for n in nodes[last_ln + 1 :] if n.op_type in ("MatMul", "Gemm")]


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation: int8 weights (per channel), activations quantised at run time.

    The classifier head stays fp32 (see ``classifier_head``).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    head = classifier_head(onnx.load(str(src)))
    with atomic_path(dst) as tmp:
        quantize_dynamic(
            str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm", "Attention"], nodes_to_exclude=head,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )  # fmt: skip
    return Path(dst)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and compute, fp32 inputs and outputs (for GPUs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
    return Path(dst)


# ------------------------------------------------------------------ FLOPs
def count_gflop_per_image(path: str | Path) -> float:
    """GFLOP of one image's forward pass: MatMul, Gemm and Conv, from shape inference."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    flops = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
            if a and b and out and all(out) and a[-1]:
                k = a[-2] if node.op_type == "Gemm" and _attr(node, "transA") else a[-1]
                flops += 2 * int(np.prod(out)) * k
        elif node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and out and all(out):
                flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return flops / 1e9


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


# ------------------------------------------------------------------ accuracy
def accuracy(logits: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None) -> dict[str, float]:
    out: dict[str, float] = {}
    if labels is not None:
        top5 = np.argsort(-logits, axis=1)[:, : min(5, logits.shape[1])]
        out["top1"] = float(np.mean(top5[:, 0] == labels))
        out["top5"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    if reference is not None:
        out["top1_agreement"] = float(np.mean(logits.argmax(1) == reference.argmax(1)))
    return out


# ---------------------------------------------------------------- scenario
@dataclass
class Scenario:
    """What to measure. Durations are per cell and round."""

    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    warmup: int = 3
    min_runs: int = 5
    min_seconds: float = 1.0
    rounds: int = 3


def run_benchmark(
    backends: list[Any],
    scenario: Scenario,
    eval_images: np.ndarray,
    eval_labels: np.ndarray | None = None,
    gflop_per_image: float | None = None,
    model_info: dict[str, Any] | None = None,
) -> BenchmarkReport:
    """Measures every backend at every batch size in alternating rounds.

    Args:
        backends: KerasBackend / OrtBackend instances (distinct provider+variant).
        scenario: Batch sizes and timing budget.
        eval_images: Real images (raw pixels) for timing inputs and accuracy.
        eval_labels: Their labels, for top-1/top-5 (None: agreement only).
        gflop_per_image: Model FLOPs, for GFLOP/s and the roofline fraction.
    """
    roof = sgemm_roofline()
    reference = next((b for b in backends if b.backend == "onnxruntime" and b.variant == "fp32"
                      and b.provider == "CPUExecutionProvider"), None)  # fmt: skip
    ref_logits = reference.predict(eval_images) if reference else None
    quality = {id(b): accuracy(b.predict(eval_images), eval_labels, ref_logits) for b in backends}
    samples: dict[tuple[int, int], list[float]] = {}
    for bs in scenario.batch_sizes:
        batch = np.resize(eval_images, (bs, *eval_images.shape[1:])).astype(np.float32)
        runners = {id(b): b.prepare(batch) for b in backends}
        for _ in range(scenario.rounds):
            for b in backends:
                samples.setdefault((id(b), bs), []).extend(
                    measure(runners[id(b)], scenario.warmup, scenario.min_runs, scenario.min_seconds)
                )
    results = []
    for b in backends:
        for bs in scenario.batch_sizes:
            lat = LatencyStats.from_seconds(samples[(id(b), bs)])
            ips = bs * 1000.0 / lat.mean
            gflops = ips * gflop_per_image if gflop_per_image else None
            q = quality[id(b)]
            results.append(BenchmarkResult(
                backend=b.backend, provider=b.provider, variant=b.variant, batch_size=bs, latency_ms=lat,
                throughput_ips=ips, runs=len(samples[(id(b), bs)]), top1=q.get("top1"), top5=q.get("top5"),
                top1_agreement=q.get("top1_agreement"), gflops_per_s=gflops,
                roofline_fraction=(gflops / roof["gflops"]) if gflops and b.provider not in GPU_PROVIDERS else None,
                providers_used=list(b.providers_used),
            ))  # fmt: skip
    env = environment()
    env["providers_used"] = sorted({p for b in backends for p in b.providers_used})
    return BenchmarkReport(
        environment=env, results=results, roofline=roof,
        model={**(model_info or {}), "gflop_per_image": gflop_per_image or 0.0},
        settings={**asdict(scenario), "eval_images": int(len(eval_images)), "labels": eval_labels is not None},
    )  # fmt: skip


def plot_throughput(report: BenchmarkReport, path: str | Path) -> Path:
    """Throughput vs batch size, one line per backend/provider/variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    keys = sorted({(r.backend, r.provider, r.variant) for r in report.results})
    for key in keys:
        rows = sorted((r for r in report.results if (r.backend, r.provider, r.variant) == key),
                      key=lambda r: r.batch_size)  # fmt: skip
        label = f"{key[0]} {key[1].replace('ExecutionProvider', '')} {key[2]}"
        ax.plot([r.batch_size for r in rows], [r.throughput_ips for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"Inference throughput ({report.environment.get('cpu_model')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ------------------------------------------------------------ entry point
def fit_to_input(images: np.ndarray, input_shape: list[Any]) -> np.ndarray:
    """Adapts NHWC images to a model input that is NHWC or NCHW (same H, W, C)."""
    want = [d if isinstance(d, int) else None for d in input_shape[1:]]
    if len(want) == 3 and want[0] == images.shape[3] and list(images.shape[1:3]) == want[1:]:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return images


def random_images(input_shape: list[Any], n: int = 64, seed: int = 0) -> np.ndarray:
    """Uniform 0-255 inputs shaped like the model's input (when no data is given)."""
    dims = [d if isinstance(d, int) and d > 0 else 32 for d in input_shape[1:]]
    return np.random.default_rng(seed).uniform(0, 255, size=(n, *dims)).astype(np.float32)


def benchmark_files(
    fp32_path: str | Path,
    out_dir: str | Path,
    keras_model=None,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    variants: tuple[str, ...] = ("fp32", "optimized", "int8", "fp16"),
    providers: list[str] | None = None,
    scenario: Scenario | None = None,
    keras_xla: bool = False,
    min_agreement: float = 0.99,
    model_info: dict[str, Any] | None = None,
) -> tuple[BenchmarkReport, dict[str, Path]]:
    """Builds the variants, measures the matrix and writes report.json/.md and a plot.

    Returns:
        The report and the written files (``json``, ``markdown``, ``plot`` and one
        path per variant).
    """
    scenario = scenario or Scenario()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requested = resolve_providers(providers)
    actual = {p: probe_provider(fp32_path, p) for p in requested}
    fallbacks = {p: a for p, a in actual.items() if p != a}
    for p, a in fallbacks.items():
        log.warning("%s was requested but the session runs on %s; its rows are not reported", p, a)
    usable = [p for p in requested if p == actual[p]]
    gpu = any(p in GPU_PROVIDERS for p in usable)
    paths = make_variants(fp32_path, out_dir / "variants", list(variants), gpu)
    input_shape = _input_shape(fp32_path)
    if eval_images is None:
        eval_images, eval_labels = random_images(input_shape), None
    eval_images = fit_to_input(eval_images, input_shape)
    backends: list[Any] = []
    if keras_model is not None:
        backends.append(KerasBackend(keras_model))
        if keras_xla:
            backends.append(KerasBackend(keras_model, xla=True))
    for provider in usable:
        for variant, path in paths.items():
            if (variant == "int8" and provider in GPU_PROVIDERS) or (
                variant == "fp16" and provider not in GPU_PROVIDERS
            ):
                continue  # int8 dynamic kernels are CPU kernels; fp16 is slower than fp32 on CPUs
            backends.append(OrtBackend(path, provider, variant, cache_dir=str(out_dir / "trt-cache")))
    report = run_benchmark(
        backends, scenario, eval_images, eval_labels,
        gflop_per_image=count_gflop_per_image(fp32_path), model_info=model_info,
    )  # fmt: skip
    report.environment["provider_fallbacks"] = fallbacks
    report.settings["min_agreement"] = min_agreement
    for r in report.results:
        if r.top1_agreement is not None and r.top1_agreement < min_agreement:
            log.warning("%s/%s top-1 agreement %.2f%% is below %.0f%%", r.provider, r.variant,
                        100 * r.top1_agreement, 100 * min_agreement)  # fmt: skip
    report.settings["agreement_violations"] = sorted(
        {f"{r.provider}/{r.variant}" for r in report.results
         if r.top1_agreement is not None and r.top1_agreement < min_agreement}
    )  # fmt: skip
    files = {
        "json": report.save_json(out_dir / "report.json"),
        "markdown": write_text(out_dir / "report.md", report.to_markdown()),
        "plot": plot_throughput(report, out_dir / "throughput.png"),
        **{f"variant_{k}": v for k, v in paths.items()},
    }
    return report, files


def _input_shape(path: str | Path) -> list[Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.get_inputs()[0].shape)


def fresh_keras_model(cfg, num_classes: int = 100, seed: int = 0):
    """The preset's architecture with fresh weights, ready to time.

    Fresh biases are zeros and LayerNorm scales ones; TensorFlow's graph
    optimiser folds such constants away during export, which would make the ONNX
    graph cheaper than a trained one. Small random values keep every op in.
    """
    from vit_pipeline.model import build_vit

    rng = np.random.default_rng(seed)
    calibration = rng.uniform(0, 255, size=(256, cfg.input_size, cfg.input_size, 3)).astype(np.float32)
    model = build_vit(cfg, num_classes, (cfg.input_size, cfg.input_size, 3), train_images=calibration)
    weights = [
        w if w.size <= 3 else w + rng.normal(0, 0.02, w.shape).astype(w.dtype) for w in model.get_weights()
    ]
    model.set_weights(weights)
    return model
