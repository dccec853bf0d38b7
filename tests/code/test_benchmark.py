"""The benchmark on a tiny model: a complete, well-formed report."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vit_pipeline.benchmark import OrtBackend, Scenario, benchmark_files
from vit_pipeline.cli import main

QUICK = Scenario(batch_sizes=(1, 4), warmup=1, min_runs=3, min_seconds=0.05, rounds=2)
KEYS = {"backend", "provider", "variant", "batch_size", "latency_ms", "throughput_ips", "top1", "top5",
        "top1_agreement"}  # fmt: skip


@pytest.fixture(scope="module")
def report_and_files(tiny_export, real_cut, tmp_path_factory):
    model, path, _ = tiny_export
    out = tmp_path_factory.mktemp("bench")
    return benchmark_files(
        path, out, keras_model=model, eval_images=real_cut[2][:48], eval_labels=real_cut[3][:48],
        variants=("fp32", "optimized", "int8", "fp16"), providers=["cuda", "cpu"], scenario=QUICK,
        keras_xla=True,
    )  # fmt: skip


def test_every_cell_is_present_and_consistent(report_and_files):
    report, _ = report_and_files
    cells = {(r.backend, r.provider, r.variant, r.batch_size) for r in report.results}
    expected = {("keras", "tensorflow", "fp32", b) for b in (1, 4)}
    expected |= {("keras", "tensorflow-xla", "fp32", b) for b in (1, 4)}
    cpu = "CPUExecutionProvider"
    expected |= {("onnxruntime", cpu, v, b) for v in ("fp32", "optimized", "int8") for b in (1, 4)}
    if report.environment["provider_fallbacks"]:  # no usable GPU here: no GPU rows, no fp16 on CPU
        assert cells == expected
    assert len(cells) == len(report.results)
    for r in report.results:
        lat = r.latency_ms
        assert 0 < lat.p50 <= lat.p90 <= lat.p95 <= lat.p99
        assert lat.mean > 0 and lat.stdev >= 0 and r.runs >= 2 * QUICK.min_runs
        assert r.throughput_ips == pytest.approx(r.batch_size * 1000 / lat.mean)
        assert 0 <= r.top1 <= r.top5 <= 1
        assert r.gflops_per_s > 0
        if r.backend == "onnxruntime":
            assert r.providers_used[0] == r.provider


def test_accuracy_and_agreement_per_variant(report_and_files):
    report, _ = report_and_files
    rows = {r.variant: r for r in report.results if r.backend == "onnxruntime" and r.batch_size == 1}
    assert rows["fp32"].top1_agreement == 1.0
    assert rows["optimized"].top1_agreement == 1.0 and rows["optimized"].top1 == rows["fp32"].top1
    assert 0.5 <= rows["int8"].top1_agreement <= 1.0
    keras_row = next(r for r in report.results if r.backend == "keras")
    assert keras_row.top1 == rows["fp32"].top1


def test_provider_detection_reports_the_truth(tiny_export, report_and_files):
    _, path, _ = tiny_export
    backend = OrtBackend(path, "CUDAExecutionProvider", "fp32")
    assert backend.provider == backend.session.get_providers()[0]
    report, _ = report_and_files
    fallbacks = report.environment["provider_fallbacks"]
    if backend.provider != "CUDAExecutionProvider":
        assert fallbacks == {"CUDAExecutionProvider": backend.provider}
        assert all(r.provider != "CUDAExecutionProvider" for r in report.results)
    assert set(report.environment["providers_used"]) >= {"CPUExecutionProvider"}


def test_files_json_schema_markdown_plot(report_and_files):
    report, files = report_and_files
    doc = json.loads(files["json"].read_text())
    assert set(doc) >= {"environment", "results", "roofline", "model", "schema_version"}
    assert doc["environment"]["cpu_count"] >= 1 and doc["environment"]["versions"]["onnxruntime"]
    assert doc["roofline"]["gflops"] > 0
    for row in doc["results"]:
        assert set(row) >= KEYS
        assert set(row["latency_ms"]) == {"mean", "p50", "p90", "p95", "p99", "stdev"}
    table = files["markdown"].read_text()
    assert table.count("\n| ") == len(report.results) + 1  # header + one row per cell
    with Image.open(files["plot"]) as img:
        assert img.format == "PNG"
    assert any("ORT optimized / Keras" in line for line in report.ratios())


def test_int8_is_flagged_below_the_agreement_threshold(tiny_export, real_cut, tmp_path):
    model, path, _ = tiny_export
    quick = Scenario(batch_sizes=(2,), warmup=1, min_runs=2, min_seconds=0.01, rounds=1)
    args = dict(eval_images=real_cut[2][:16], eval_labels=real_cut[3][:16], variants=("fp32", "int8"),
                providers=["cpu"], scenario=quick)  # fmt: skip
    strict, _ = benchmark_files(path, tmp_path / "a", min_agreement=1.01, **args)
    assert "CPUExecutionProvider/int8" in strict.settings["agreement_violations"]
    lenient, _ = benchmark_files(path, tmp_path / "b", min_agreement=0.0, **args)
    assert lenient.settings["agreement_violations"] == []


def test_cli_benchmark_any_onnx_model(tiny_export, tmp_path):
    _, path, _ = tiny_export
    out = tmp_path / "r" / "report.json"
    args = ["benchmark", str(path), "--batch-sizes", "1,2", "--variants", "fp32,optimized", "--seconds", "0.02",
            "--rounds", "1", "--providers", "cpu", "--output", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {r["variant"] for r in doc["results"]} == {"fp32", "optimized"}
    assert all(r["top1"] is None for r in doc["results"])  # no labelled data given


def test_cli_benchmark_rejects_a_non_onnx_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(main, ["benchmark", str(bad)])
    assert result.exit_code == 1 and "not a loadable ONNX model" in result.output
    both = CliRunner().invoke(main, ["benchmark", str(bad), "--preset", "cifar100"])
    assert both.exit_code == 2


def test_nchw_models_get_transposed_inputs():
    from vit_pipeline.benchmark import fit_to_input

    x = np.zeros((2, 32, 32, 3), np.float32)
    assert fit_to_input(x, ["N", 3, 32, 32]).shape == (2, 3, 32, 32)
    assert fit_to_input(x, ["N", 32, 32, 3]).shape == (2, 32, 32, 3)
