"""The benchmark entry point: backends x variants x batch sizes, one report, one choice.

Backends (``backends/``) are apart from the scenario (``scenario.py``); the
report (``report.py``) is the stable interface. ``benchmark_files`` times the
variant files it is given (the ones exported and registered) or builds them
once with ``vit_pipeline.variants``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from vit_consumer.contract import fastest

from vit_pipeline import variants as variants_mod
from vit_pipeline.benchmark.backends.keras import KerasBackend
from vit_pipeline.benchmark.backends.onnxruntime import (
    GPU_PROVIDERS,
    OrtBackend,
    probe_provider,
    resolve_providers,
)
from vit_pipeline.benchmark.environment import environment
from vit_pipeline.benchmark.memory import measure_memory
from vit_pipeline.benchmark.report import CPU, BenchmarkReport, BenchmarkResult, LatencyStats
from vit_pipeline.benchmark.roofline import count_gflop_per_image, rooflines
from vit_pipeline.benchmark.scenario import Scenario, time_cells
from vit_pipeline.evaluate import scores
from vit_pipeline.fsutil import atomic_path, write_text

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.995  # top-1 agreement with the fp32 reference a served candidate needs


def run_benchmark(
    backends: list[Any],
    scenario: Scenario,
    eval_images: np.ndarray,
    eval_labels: np.ndarray | None = None,
    gflop_per_image: float | None = None,
    model_info: dict[str, Any] | None = None,
    roofline_seconds: float = 2.0,
) -> BenchmarkReport:
    """Measures every backend at every batch size in alternating rounds.

    Agreement is measured against the Keras model when one is among the
    backends (the fp32 truth), otherwise against ONNX Runtime's fp32 export.
    """
    roofs = rooflines(roofline_seconds)
    reference = next((b for b in backends if b.backend == "keras"), None) or next(
        (b for b in backends if b.backend == "onnxruntime" and b.variant == "fp32" and b.provider == CPU),
        None,
    )
    ref_logits = reference.predict(eval_images) if reference else None
    quality = [scores(b.predict(eval_images), eval_labels, ref_logits) for b in backends]
    samples = time_cells(backends, scenario, eval_images)
    results = []
    for i, b in enumerate(backends):
        roof = roofs.get(b.precision) if b.provider not in GPU_PROVIDERS else None
        for bs in scenario.batch_sizes:
            lat = LatencyStats.from_seconds(samples[(i, bs)])
            ips = bs * 1000.0 / lat.mean
            gflops = ips * gflop_per_image if gflop_per_image else None
            results.append(BenchmarkResult(
                backend=b.backend, provider=b.provider, variant=b.variant, batch_size=bs, latency_ms=lat,
                throughput_ips=ips, runs=len(samples[(i, bs)]), top1=quality[i].get("top1"),
                top5=quality[i].get("top5"), top1_agreement=quality[i].get("top1_agreement"),
                gflops_per_s=gflops, roofline_fraction=gflops / roof["gflops"] if gflops and roof else None,
                providers_used=list(b.providers_used), precision=b.precision,
                roofline_gflops=roof["gflops"] if roof else None,
            ))  # fmt: skip
    env = environment()
    env["providers_used"] = sorted({p for b in backends for p in b.providers_used})
    return BenchmarkReport(
        environment=env, results=results, roofline=roofs,
        model={**(model_info or {}), "gflop_per_image": gflop_per_image or 0.0},
        settings={**asdict(scenario), "eval_images": int(len(eval_images)), "labels": eval_labels is not None,
                  "agreement_reference": f"{reference.backend}/{reference.variant}" if reference else None},
    )  # fmt: skip


def choose_served(
    report: BenchmarkReport, candidates: set[str], min_agreement: float = MIN_AGREEMENT
) -> dict:
    """The fastest candidate (geometric mean of img/s over the batch sizes) that keeps agreement.

    Args:
        candidates: Row labels that may be served (``onnxruntime/optimized``, ...).
    """
    ips, refused = {}, {}
    for label in sorted(candidates):
        rows = [r for r in report.results if r.label == label]
        if not rows:
            continue
        agreement = rows[0].top1_agreement
        if agreement is not None and agreement < min_agreement:
            refused[label] = f"agreement {agreement:.2%} < {min_agreement:.1%}"
            continue
        ips[label] = [r.throughput_ips for r in rows]
    if not ips:
        return {"label": None, "reason": "no candidate passed", "refused": refused}
    best, scores = fastest(ips)
    return {"label": best, "scores_ips_geomean": scores, "refused": refused, "min_agreement": min_agreement,
            "reason": f"fastest candidate passing the agreement gate ({scores[best]:.0f} img/s geometric mean "
                      f"over batch sizes {list(report.settings.get('batch_sizes', []))})"}  # fmt: skip


def plot_throughput(report: BenchmarkReport, path: str | Path) -> Path:
    """Throughput vs batch size, one line per backend/provider/variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label in sorted({r.label for r in report.results}):
        rows = sorted((r for r in report.results if r.label == label), key=lambda r: r.batch_size)
        ax.plot([r.batch_size for r in rows], [r.throughput_ips for r in rows], marker="o",
                label=f"{label} ({rows[0].precision})")  # fmt: skip
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


def _input_shape(path: str | Path) -> list[Any]:
    from vit_pipeline.benchmark.backends.onnxruntime import session

    return list(session(path).get_inputs()[0].shape)


def _openvino_backends(paths: dict[str, Path], missing: dict[str, str], served: tuple[str, ...]) -> list[Any]:
    """OpenVINO as a user would run it (the plain export, default precision and f32), and as the consumer
    may serve it: on each registered file (``served``), at both precisions."""
    from vit_pipeline.benchmark.backends import openvino

    ok, why = openvino.available()
    if not ok:
        missing["openvino"] = why
        return []
    out = []
    for variant in ("fp32", *(v for v in served if v != "fp32")):
        if variant not in paths:
            continue
        try:
            out.append(openvino.OpenVinoBackend(paths[variant], variant))
            if not variant.startswith("int8"):  # an int8 file's GEMMs are int8 at either hint
                out.append(openvino.OpenVinoBackend(paths[variant], variant, f32=True))
        except RuntimeError as exc:  # e.g. ONNX Runtime's contrib ops (QAttention) that OpenVINO cannot read
            missing[f"openvino/{variant}"] = _first_failure(exc)
    return out


def _first_failure(exc: BaseException) -> str:
    """The line of an OpenVINO error that says what failed (its message is a page of source locations)."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check "))]
    return (useful[-1] if useful else lines[0] if lines else type(exc).__name__)[:200]


def _memory(
    backends: list[Any], keras_path: str | None, input_shape: list[int], batch: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in backends:
        label = BenchmarkResult(
            b.backend, b.provider, b.variant, 0, LatencyStats(0, 0, 0, 0, 0, 0), 0, 0
        ).label
        if b.backend == "keras":
            if not keras_path:
                out[label] = {"error": "no .keras file to load in a child process"}
                continue
            spec = {"backend": "keras", "path": keras_path, "xla": b.provider.endswith("xla")}
        elif b.backend == "openvino":
            spec = {
                "backend": "openvino",
                "path": str(b.path),
                "variant": b.variant,
                "f32": b.provider.endswith("f32"),
            }
        else:
            spec = {
                "backend": "onnxruntime",
                "path": str(b.path),
                "provider": b.provider,
                "variant": b.variant,
            }
        out[label] = measure_memory({**spec, "batch_size": batch, "input_shape": input_shape})
    return out


def benchmark_files(
    fp32_path: str | Path,
    out_dir: str | Path,
    keras_model=None,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    variants: tuple[str, ...] = ("fp32", "optimized", "int8", "int8-static", "fp16"),
    providers: list[str] | None = None,
    scenario: Scenario | None = None,
    keras_xla: bool = False,
    min_agreement: float = MIN_AGREEMENT,
    model_info: dict[str, Any] | None = None,
    variant_paths: dict[str, str | Path] | None = None,
    calibration: np.ndarray | None = None,
    keras_path: str | None = None,
    openvino: bool = True,
    memory: bool = False,
    roofline_seconds: float = 2.0,
    serve_candidates: tuple[str, ...] | None = None,
) -> tuple[BenchmarkReport, dict[str, Path]]:
    """Measures the matrix, chooses the served candidate, writes report.json/.md and a plot.

    Args:
        variant_paths: Prebuilt variant files (the exported, registered ones);
            missing requested variants are built here with ``vit_pipeline.variants``.
        calibration: Real training images for ``int8-static``.
        keras_path: The ``.keras`` file (memory of the Keras backend in a child).
        openvino: Add OpenVINO rows when it is installed (the report says why not).
        memory: Measure peak RSS per backend in child processes.
        serve_candidates: Variants the served one is chosen from (the registered
            ones), each on ONNX Runtime's CPU provider or OpenVINO (default
            precision and f32); None: every CPU variant.

    Returns:
        The report and the written files (``json``, ``markdown``, ``plot``, one per variant).
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
    paths = {k: Path(v) for k, v in (variant_paths or {}).items() if k in variants}
    paths.setdefault("fp32", Path(fp32_path))
    todo = [v for v in variants if v not in paths]
    if todo:
        paths.update(variants_mod.build_variants(fp32_path, out_dir / "variants", todo, gpu, calibration))
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
            on_gpu = provider in GPU_PROVIDERS
            if (variant in variants_mod.CPU_ONLY and on_gpu) or (
                variant in variants_mod.GPU_ONLY and not on_gpu
            ):
                continue
            backends.append(OrtBackend(path, provider, variant, cache_dir=str(out_dir / "trt-cache")))
    missing: dict[str, str] = {}
    registered = tuple(serve_candidates) if serve_candidates else tuple(
        v for v in paths if v not in variants_mod.GPU_ONLY)  # fmt: skip
    if openvino:
        backends += _openvino_backends(paths, missing, registered)
    report = run_benchmark(
        backends, scenario, eval_images, eval_labels, gflop_per_image=count_gflop_per_image(fp32_path),
        model_info=model_info, roofline_seconds=roofline_seconds,
    )  # fmt: skip
    report.environment["provider_fallbacks"] = fallbacks
    report.settings.update(min_agreement=min_agreement, backends_missing=missing)
    report.settings["agreement_violations"] = sorted(
        {r.label for r in report.results if r.top1_agreement is not None and r.top1_agreement < min_agreement}
    )  # fmt: skip
    for label in report.settings["agreement_violations"]:
        log.info("%s top-1 agreement is below %.1f%%: not a serving candidate", label, 100 * min_agreement)
    # What the consumer may serve: the registered files, on ONNX Runtime's CPU provider or OpenVINO.
    servable = {r.label for r in report.results if r.variant in registered
                and (r.backend == "openvino" or (r.backend == "onnxruntime" and r.provider == CPU))}  # fmt: skip
    report.choice = choose_served(report, servable, min_agreement)
    if memory:
        report.memory = _memory(backends, keras_path, [int(d) for d in eval_images.shape[1:]],
                                max(scenario.batch_sizes))  # fmt: skip
    files = {
        "json": report.save_json(out_dir / "report.json"),
        "markdown": write_text(out_dir / "report.md", report.to_markdown()),
        "plot": plot_throughput(report, out_dir / "throughput.png"),
        **{f"variant_{k}": v for k, v in paths.items()},
    }
    return report, files


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
