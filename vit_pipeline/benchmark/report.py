"""The benchmark report: a typed, versioned JSON document with a loader.

Stable top-level keys: ``environment`` and ``results`` (plus ``model``,
``roofline``, ``settings``, ``memory``, ``choice`` and ``schema_version``). Each
result is one cell: a backend, its provider, the model variant, the precision the
engine really computed in, a batch size, latency percentiles (ms), throughput
(images/s), accuracy where labels were given, and the fraction of the roofline of
its own precision.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from vit_consumer import contract

from vit_pipeline.fsutil import write_text

SCHEMA_VERSION = 2
CPU = contract.CPU
OV_DEFAULT = "openvino-CPU"  # OpenVINO as it comes (its own precision choice)
OV_F32 = "openvino-CPU-f32"  # with INFERENCE_PRECISION_HINT=f32


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

    backend: str  # "keras", "onnxruntime" or "openvino"
    provider: str  # what really ran: an ORT provider, "tensorflow[-xla]", "openvino-CPU"
    variant: str  # the model file: "fp32", "optimized", "int8", "int8-static", "fp16"
    batch_size: int
    latency_ms: LatencyStats
    throughput_ips: float  # images per second = batch_size * 1000 / mean latency
    runs: int
    top1: float | None = None
    top5: float | None = None
    top1_agreement: float | None = None  # with the reference (Keras when given, else ORT fp32)
    gflops_per_s: float | None = None
    roofline_fraction: float | None = None  # of the roofline of ``precision``
    providers_used: list[str] = field(default_factory=list)
    precision: str = "fp32"  # what the engine computed in (int8 GEMMs, bf16 hint, ...)
    roofline_gflops: float | None = None  # the limit ``roofline_fraction`` refers to

    @property
    def label(self) -> str:
        """``backend/variant`` (with the provider when it is not the CPU), e.g. ``openvino/fp32``."""
        provider = "" if self.provider in (CPU, "tensorflow", OV_DEFAULT) else f"[{self.provider}]"
        return f"{self.backend}/{self.variant}{provider}"

    @property
    def ran_as(self) -> str | None:
        """The precision the engine computed in, where it is not the file's own (None where it is).

        OpenVINO as it comes runs a fp32 file in bf16 on a CPU with AVX512-BF16 or AMX: a name that says
        only ``fp32`` would tell the reader of a metric or a ratio something untrue. Only OpenVINO's rows: their
        precision is the compiled model's own answer (``INFERENCE_PRECISION_HINT``); the other backends'
        precision is read from the graph and says nothing a file's name does not.
        """
        if self.backend != "openvino":
            return None
        own = "int8" if self.variant.startswith("int8") else "fp16" if self.variant == "fp16" else "fp32"
        return None if self.precision == own else self.precision

    @property
    def shown(self) -> str:
        """``label`` for people: with the precision it ran in where that is not the file's, e.g.
        ``openvino/fp32 (ran in bf16)``. ``label`` stays the identifier (the served choice, memory)."""
        return f"{self.label} (ran in {self.ran_as})" if self.ran_as else self.label


@dataclass
class BenchmarkReport:
    """Environment snapshot, rooflines, memory and every measured cell."""

    environment: dict[str, Any]
    results: list[BenchmarkResult]
    model: dict[str, Any] = field(default_factory=dict)
    roofline: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)  # label -> peak RSS (MiB), own process each
    choice: dict[str, Any] = field(default_factory=dict)  # the served candidate and why
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchmarkReport:
        """Reads this schema and version 1 (no precision, memory or choice)."""
        known = {f.name for f in fields(BenchmarkResult)}
        results = []
        for row in raw["results"]:
            row = {k: v for k, v in row.items() if k in known}
            if "precision" not in row:  # version 1: the variant said it
                v = row["variant"]
                row["precision"] = "int8" if v.startswith("int8") else ("fp16" if v == "fp16" else "fp32")
            row["latency_ms"] = LatencyStats(**row["latency_ms"])
            results.append(BenchmarkResult(**row))
        top = {f.name for f in fields(cls)} - {"results"}
        return cls(results=results, **{k: v for k, v in raw.items() if k in top})

    @classmethod
    def from_json(cls, path: str | Path) -> BenchmarkReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ queries
    def rows(self, batch_size: int, backend: str | None = None) -> list[BenchmarkResult]:
        return [r for r in self.results if r.batch_size == batch_size and backend in (None, r.backend)]

    def baseline(self, batch_size: int) -> BenchmarkResult | None:
        """The fastest Keras row at this batch size."""
        return max(self.rows(batch_size, "keras"), key=lambda r: r.throughput_ips, default=None)

    def find(self, variant: str, provider: str, batch_size: int, backend: str = "onnxruntime"):
        return next((r for r in self.rows(batch_size, backend)
                     if r.variant == variant and r.provider == provider), None)  # fmt: skip

    def peers(self, batch_size: int) -> dict[str, BenchmarkResult]:
        """What a user gets without this project's work: Keras at its best, ORT on the fused
        fp32 graph, OpenVINO as it comes (default precision) and at f32."""
        out = {}
        if base := self.baseline(batch_size):
            out["Keras best"] = base
        if fused := self.find("optimized", CPU, batch_size):
            out["ORT fused fp32"] = fused
        for r in self.rows(batch_size, "openvino"):
            if r.variant == "fp32":  # the file a user hands to OpenVINO: the plain export
                out["OpenVINO default" if r.provider == OV_DEFAULT else "OpenVINO f32"] = r
        return out

    def served(self, batch_size: int) -> BenchmarkResult | None:
        """The row of the candidate chosen for serving (``choice``), at this batch size."""
        label = self.choice.get("label")
        return next((r for r in self.rows(batch_size) if r.label == label), None)

    # ------------------------------------------------------------------- output
    def to_markdown(self) -> str:
        """The table, with ratios to the Keras baseline at the same batch size."""
        env = self.environment
        versions = env.get("versions", {})
        lines = [
            f"Model: {self.model.get('name', '?')} ({self.model.get('gflop_per_image', 0):.3f} GFLOP/image); "
            f"CPU: {env.get('cpu_model')} x{env.get('cpu_count')} ({', '.join(env.get('cpu_isa', [])) or '-'}); "
            f"onnxruntime {versions.get('onnxruntime')}, openvino {versions.get('openvino', '-')}, "
            f"tensorflow {versions.get('tensorflow', '-')}",
            "Rooflines measured in this run: "
            + "; ".join(
                f"{p} {v['gflops']:.0f} GFLOP/s ({v['method']})" for p, v in self.rooflines().items()
            ),
        ]
        if missing := self.settings.get("backends_missing"):
            lines.append("Not measured: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
        lines += [
            "",
            "| backend | provider | variant | precision | batch | mean ms | p50 | p90 | p99 | img/s | vs Keras | "
            "GFLOP/s | % of its roofline | top-1 | top-5 | agreement | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {"keras": 0, "onnxruntime": 1, "openvino": 2}
        for r in sorted(
            self.results, key=lambda r: (r.batch_size, order.get(r.backend, 9), r.provider, r.variant)
        ):
            base = self.baseline(r.batch_size)
            ratio = f"{r.throughput_ips / base.throughput_ips:.2f}x" if base else "-"
            lat = r.latency_ms
            rss = self.memory.get(r.label, {}).get("peak_rss_mib")
            lines.append(
                f"| {r.backend} | {r.provider} | {r.variant} | {r.precision} | {r.batch_size} | {lat.mean:.2f} | "
                f"{lat.p50:.2f} | {lat.p90:.2f} | {lat.p99:.2f} | {r.throughput_ips:.1f} | {ratio} | "
                f"{_fmt(r.gflops_per_s, '.1f')} | {_fmt(r.roofline_fraction, '.0%')} | {_fmt(r.top1, '.4f')} | "
                f"{_fmt(r.top5, '.4f')} | {_fmt(r.top1_agreement, '.2%')} | {_fmt(rss, '.0f')} |"
            )
        if self.choice:
            lines += [
                "",
                f"Served candidate: **{self.shown_label(self.choice.get('label'))}** ({self.choice.get('reason', '')})",
            ]
        return "\n".join(lines) + "\n"

    def first_row(self, label: str | None) -> BenchmarkResult | None:
        """A row of the candidate ``label`` (its precision and name are the same at every batch size)."""
        return next((r for r in self.results if r.label == label), None)

    def shown_label(self, label: str | None) -> str | None:
        """A label as people read it: with the precision its rows ran in (``BenchmarkResult.shown``)."""
        row = self.first_row(label)
        return row.shown if row else label

    def rooflines(self) -> dict[str, dict[str, Any]]:
        """Precision -> roofline; version-1 reports held one fp32 roofline."""
        if "gflops" in self.roofline:
            return {"fp32": self.roofline}
        return self.roofline

    def mlflow_metrics(self) -> dict[str, float]:
        """The report as MLflow metrics, named one way wherever a report is logged.

        ``bench_<backend>_<provider>_<variant>_b<batch>_ips`` and ``..._p50_ms`` per row
        (e.g. ``bench_onnxruntime_cpu_optimized_b1_ips``); ``agreement_<provider>_<variant>``
        at the first batch size; the GEMM rooflines (``sgemm_roofline_gflops``, ...). A row that
        computed in another precision than its file's says so after the variant:
        ``bench_openvino_openvino_cpu_fp32_as_bf16_b1_ips`` (OpenVINO's default on a bf16 CPU).
        The served choice's rows again as ``bench_served_b<batch>_ips`` / ``_p50_ms`` / ``_mean_ms``: one name
        whatever engine serves, so runs compare in the MLflow UI's runs table (the choice differs between runs).
        """
        metrics = {}
        for r in self.results:
            provider = r.provider.replace("ExecutionProvider", "").lower()
            variant = f"{r.variant}_as_{r.ran_as}" if r.ran_as else r.variant
            key = f"bench_{r.backend}_{provider}_{variant}_b{r.batch_size}".replace("-", "_")
            metrics[f"{key}_ips"] = r.throughput_ips
            metrics[f"{key}_p50_ms"] = r.latency_ms.p50
            if r.top1_agreement is not None and r.batch_size == self.settings["batch_sizes"][0]:
                metrics[f"agreement_{provider}_{variant}".replace("-", "_")] = r.top1_agreement
        for bs in self.settings["batch_sizes"]:
            if (served := self.served(bs)) is not None:
                metrics |= {f"bench_served_b{bs}_ips": served.throughput_ips,
                            f"bench_served_b{bs}_p50_ms": served.latency_ms.p50,
                            f"bench_served_b{bs}_mean_ms": served.latency_ms.mean}  # fmt: skip
        for precision, roof in self.rooflines().items():
            metrics[f"{'s' if precision == 'fp32' else precision + '_'}gemm_roofline_gflops"] = roof["gflops"]
        return metrics

    def table_rows(self) -> list[dict[str, Any]]:
        """The results as rows for people (a Prefect table artifact)."""
        return [
            {"backend": r.backend, "provider": r.provider, "variant": r.variant, "precision": r.precision,
             "batch": r.batch_size, "p50_ms": round(r.latency_ms.p50, 3), "p99_ms": round(r.latency_ms.p99, 3),
             "img_per_s": round(r.throughput_ips, 1), "top1": r.top1, "agreement": r.top1_agreement}
            for r in self.results
        ]  # fmt: skip

    def ratios(self) -> list[str]:
        """Human-readable speed ratios measured side by side in this run."""
        out = []
        for bs in sorted({r.batch_size for r in self.results}):
            base = self.baseline(bs)
            for row in self.rows(bs, "onnxruntime") + self.rows(bs, "openvino"):
                if base and row.provider in (CPU, OV_DEFAULT, OV_F32):
                    out.append(
                        f"batch {bs}: {row.shown} / Keras = {row.throughput_ips / base.throughput_ips:.2f}x"
                    )
            served = self.served(bs)
            if served:
                for name, peer in self.peers(bs).items():
                    if peer is not served:
                        out.append(f"batch {bs}: served {served.shown} / {name} = "
                                   f"{served.throughput_ips / peer.throughput_ips:.2f}x")  # fmt: skip
        return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
