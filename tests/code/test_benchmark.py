"""The benchmark on a tiny model: a complete, well-formed report."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vit_pipeline.benchmark import BenchmarkReport, OrtBackend, Scenario, benchmark_files
from vit_pipeline.cli import main


def _importable(module: str) -> bool:
    """Asked here, not of the benchmark: a benchmark that wrongly thinks it absent must not pass."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


OPENVINO = _importable("openvino")  # the `openvino` extra, which CI installs
# The plain export as a user would run it, and each file the consumer may serve (every CPU variant here), at
# OpenVINO's default precision and f32 (int8 files: default only, their GEMMs are int8 at either hint). The
# dynamic int8 file holds ONNX Runtime's com.microsoft.QAttention, which OpenVINO cannot read: reported missing.
OPENVINO_CELLS = {("openvino-CPU", "fp32"), ("openvino-CPU-f32", "fp32"), ("openvino-CPU", "optimized"),
                  ("openvino-CPU-f32", "optimized"), ("openvino-CPU", "int8-static")}  # fmt: skip

QUICK = Scenario(batch_sizes=(1, 4), warmup=1, min_runs=3, min_seconds=0.05, rounds=2)
KEYS = {"backend", "provider", "variant", "batch_size", "latency_ms", "throughput_ips", "top1", "top5",
        "top1_agreement"}  # fmt: skip


@pytest.fixture(scope="module")
def report_and_files(tiny_export, real_cut, tmp_path_factory):
    model, path, _ = tiny_export
    out = tmp_path_factory.mktemp("bench")
    return benchmark_files(
        path, out, keras_model=model, eval_images=real_cut[2][:48], eval_labels=real_cut[3][:48],
        variants=("fp32", "optimized", "int8", "int8-static", "fp16"), providers=["cuda", "cpu"], scenario=QUICK,
        keras_xla=True, calibration=real_cut[0][:64], roofline_seconds=0.2,
    )  # fmt: skip


def _cuda_runs(path) -> bool:
    """Whether ONNX Runtime really runs this model on CUDA here (asked directly, not through the benchmark)."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider"
    if cuda not in ort.get_available_providers():
        return False
    return (
        ort.InferenceSession(str(path), providers=[cuda, "CPUExecutionProvider"]).get_providers()[0] == cuda
    )


def test_every_cell_is_present_and_consistent(report_and_files, tiny_export):
    report, _ = report_and_files
    cells = {(r.backend, r.provider, r.variant, r.batch_size) for r in report.results}
    expected = {("keras", "tensorflow", "fp32", b) for b in (1, 4)}
    expected |= {("keras", "tensorflow-xla", "fp32", b) for b in (1, 4)}
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    expected |= {
        ("onnxruntime", cpu, v, b) for v in ("fp32", "optimized", "int8", "int8-static") for b in (1, 4)
    }
    # CUDA rows only where CUDA really runs: integer variants stay on the CPU, fp16 only on the GPU.
    gpu = _cuda_runs(tiny_export[1])
    expected |= {("onnxruntime", cuda, v, b) for v in ("fp32", "optimized", "fp16") for b in (1, 4) if gpu}
    expected |= {("openvino", p, v, b) for p, v in OPENVINO_CELLS for b in (1, 4) if OPENVINO}
    assert cells == expected, (sorted(cells - expected), sorted(expected - cells))
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
        # Each row is held against the roofline of the precision it really ran in (CPU rooflines only).
        precision = "int8" if r.variant.startswith("int8") else "fp16" if r.variant == "fp16" else "fp32"
        assert r.precision == precision or r.backend == "openvino"
        if r.provider == cuda:
            assert r.roofline_gflops is None and r.roofline_fraction is None
            continue
        assert r.roofline_gflops == pytest.approx(report.rooflines()[r.precision]["gflops"])
        assert r.roofline_fraction == pytest.approx(r.gflops_per_s / r.roofline_gflops)


def test_accuracy_and_agreement_per_variant(report_and_files, tiny_export, real_cut):
    report, files = report_and_files
    rows = {r.variant: r for r in report.results if r.backend == "onnxruntime" and r.batch_size == 1}
    # Agreement is with the fp32 Keras model (the truth), on real images.
    assert report.settings["agreement_reference"] == "keras/fp32"
    assert rows["fp32"].top1_agreement == 1.0
    assert rows["optimized"].top1_agreement == 1.0 and rows["optimized"].top1 == rows["fp32"].top1
    # An untrained model's logits are nearly flat, so int8 noise flips many argmaxes: the figure
    # itself is not predictable, but it must be the one recomputed here, independently.
    images = real_cut[2][:48]
    keras_top1 = np.asarray(tiny_export[0](images.astype(np.float32), training=False)).argmax(1)
    for variant in ("int8", "int8-static"):
        top1 = (
            OrtBackend(files[f"variant_{variant}"], "CPUExecutionProvider", variant).predict(images).argmax(1)
        )
        assert rows[variant].top1_agreement == pytest.approx(float(np.mean(top1 == keras_top1)))
    keras_row = next(r for r in report.results if r.backend == "keras")
    assert keras_row.top1 == rows["fp32"].top1


def test_provider_detection_reports_the_truth(tiny_export, report_and_files):
    """Rows are labelled with what ONNX Runtime really runs, found here with a session of our own."""
    import onnxruntime as ort

    _, path, _ = tiny_export
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    truth = ort.InferenceSession(str(path), providers=[cuda, cpu]).get_providers()[0]
    assert OrtBackend(path, cuda, "fp32").provider == truth  # the request (CUDA) only where it runs
    report, _ = report_and_files  # asked for cuda and cpu
    assert report.environment["provider_fallbacks"] == ({} if truth == cuda else {cuda: truth})
    ort_rows = {r.provider for r in report.results if r.backend == "onnxruntime"}
    assert ort_rows == ({cuda, cpu} if truth == cuda else {cpu})
    assert {p for p in report.environment["providers_used"] if p.endswith("ExecutionProvider")} == ort_rows


def test_files_json_schema_markdown_plot(report_and_files):
    report, files = report_and_files
    doc = json.loads(files["json"].read_text())
    assert set(doc) >= {"environment", "results", "roofline", "model", "schema_version", "choice", "memory"}
    assert doc["environment"]["cpu_count"] >= 1 and doc["environment"]["versions"]["onnxruntime"]
    assert doc["roofline"]["fp32"]["gflops"] > 0 and doc["roofline"]["int8"]["gflops"] > 0
    # A bf16 peak only where the CPU computes bf16 (told by the kernel's flags, not by OpenVINO): on an Intel Xeon
    # without AMX or AVX512-BF16, OpenVINO emulated it and the report showed a "bf16 roofline" of 8 GFLOP/s.
    flags = set(Path("/proc/cpuinfo").read_text().split())
    if not (OPENVINO and {"avx512_bf16", "amx_bf16", "avx_ne_convert"} & flags):
        assert "bf16" not in doc["roofline"]
    elif {"avx512_bf16", "amx_bf16"} & flags:  # (AVX-NE-CONVERT alone: OpenVINO's call)
        assert doc["roofline"]["bf16"]["gflops"] > 0
    for row in doc["results"]:
        assert set(row) >= KEYS
        assert set(row["latency_ms"]) == {"mean", "p50", "p90", "p95", "p99", "stdev"}
    table = files["markdown"].read_text()
    assert table.count("\n| ") == len(report.results) + 1  # header + one row per cell
    with Image.open(files["plot"]) as img:
        assert img.format == "PNG"
    assert any("onnxruntime/optimized / Keras" in line for line in report.ratios())
    # The loader reads back what was written.
    again = BenchmarkReport.from_json(files["json"])
    assert again.to_dict() == json.loads(json.dumps(report.to_dict()))


def test_served_choice_is_the_fastest_candidate_that_keeps_agreement(report_and_files):
    report, _ = report_and_files
    choice = report.choice
    scores = choice["scores_ips_geomean"]
    assert choice["label"] == max(scores, key=scores.get)
    for label in scores:
        (row, *_) = [r for r in report.results if r.label == label]
        assert row.backend in ("onnxruntime", "openvino") and row.top1_agreement >= choice["min_agreement"]
        assert row.provider in ("CPUExecutionProvider", "openvino-CPU", "openvino-CPU-f32")
    # Every engine the consumer may serve a file with was considered: ONNX Runtime's CPU provider and
    # OpenVINO at both precisions, on every CPU variant (no serve_candidates given).
    considered = set(scores) | set(choice["refused"])
    expected = {"onnxruntime/fp32", "onnxruntime/optimized", "onnxruntime/int8", "onnxruntime/int8-static"}
    if OPENVINO:
        expected |= {"openvino/fp32", "openvino/fp32[openvino-CPU-f32]", "openvino/optimized",
                     "openvino/optimized[openvino-CPU-f32]", "openvino/int8-static"}  # fmt: skip
    assert considered == expected
    served = report.served(1)
    assert served is not None and served.label == choice["label"]
    assert any(line.startswith("batch 1: served ") for line in report.ratios())


def test_openvino_rows_are_measured(report_and_files, tiny_export, real_cut):
    if not OPENVINO:
        pytest.fail(
            "openvino is not importable, so the benchmark's OpenVINO rows cannot be checked: "
            "install the extra, pip install -e '.[dev,openvino]'"
        )
    report, _ = report_and_files
    missing = report.settings["backends_missing"]
    assert "openvino" not in missing, missing
    assert "com.microsoft.QAttention" in missing["openvino/int8"]  # said in one line, not a crash
    rows = {(r.provider, r.variant, r.batch_size): r for r in report.results if r.backend == "openvino"}
    assert set(rows) == {(p, v, b) for p, v in OPENVINO_CELLS for b in QUICK.batch_sizes}
    for r in rows.values():
        assert r.throughput_ips > 0 and r.runs >= 2 * QUICK.min_runs
        assert r.providers_used[0].startswith("openvino ")
        # Labels were given and Keras is the reference: both figures exist for every row.
        assert r.top1 is not None and 0 <= r.top1 <= r.top5 <= 1
        assert r.top1_agreement is not None and 0 <= r.top1_agreement <= 1
    assert {r.precision for (p, _, _), r in rows.items() if p == "openvino-CPU-f32"} == {"fp32"}
    assert {r.precision for (_, v, _), r in rows.items() if v == "int8-static"} == {"int8"}
    # The f32 rows ran the exported file: their agreement is the one recomputed here with OpenVINO itself.
    import openvino as ov

    images = real_cut[2][:48].astype(np.float32)
    compiled = ov.Core().compile_model(str(tiny_export[1]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_top1 = np.asarray(compiled(images)[0]).argmax(1)
    keras_top1 = np.asarray(tiny_export[0](images, training=False)).argmax(1)
    agreement = rows[("openvino-CPU-f32", "fp32", 1)].top1_agreement
    assert agreement == pytest.approx(float(np.mean(ov_top1 == keras_top1))) and agreement >= 0.9


def test_peak_memory_is_measured_per_backend_in_its_own_process(tiny_export, real_cut, tmp_path):
    _, path, _ = tiny_export
    quick = Scenario(batch_sizes=(8,), warmup=1, min_runs=2, min_seconds=0.01, rounds=1)
    report, _ = benchmark_files(path, tmp_path, eval_images=real_cut[2][:16], variants=("fp32", "int8"),
                                providers=["cpu"], scenario=quick, openvino=False, memory=True,
                                roofline_seconds=0.1)  # fmt: skip
    assert set(report.memory) == {"onnxruntime/fp32", "onnxruntime/int8"}
    for figures in report.memory.values():
        assert figures["peak_rss_mib"] > figures["engine_rss_mib"] > 10, figures


def test_the_precision_probe_session_opens_only_when_the_precision_is_read(tiny_export):
    # A memory child builds a backend and runs it; a second (probe) session would count in its peak RSS.
    from vit_pipeline.benchmark.backends.onnxruntime import OrtBackend

    _, path, _ = tiny_export
    backend = OrtBackend(path, "CPUExecutionProvider", "fp32")
    assert "_runtime" not in backend.__dict__
    assert backend.precision == "fp32" and backend.integer_ops == [] and "_runtime" in backend.__dict__


def test_int8_is_flagged_below_the_agreement_threshold(tiny_export, real_cut, tmp_path):
    model, path, _ = tiny_export
    quick = Scenario(batch_sizes=(2,), warmup=1, min_runs=2, min_seconds=0.01, rounds=1)
    args = dict(eval_images=real_cut[2][:16], eval_labels=real_cut[3][:16], variants=("fp32", "int8"),
                providers=["cpu"], scenario=quick, openvino=False, roofline_seconds=0.1)  # fmt: skip
    strict, _ = benchmark_files(path, tmp_path / "a", min_agreement=1.01, **args)
    assert "onnxruntime/int8" in strict.settings["agreement_violations"]
    lenient, _ = benchmark_files(path, tmp_path / "b", min_agreement=0.0, **args)
    assert lenient.settings["agreement_violations"] == []


def test_cli_benchmark_any_onnx_model(tiny_export, tmp_path):
    _, path, _ = tiny_export
    out = tmp_path / "r" / "report.json"
    args = ["benchmark", str(path), "--batch-sizes", "1,2", "--variants", "fp32,optimized", "--seconds", "0.02",
            "--rounds", "1", "--providers", "cpu", "--no-memory", "--output", str(out)]  # fmt: skip
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


def test_benchmark_docs_page_is_rendered_from_every_committed_report():
    from pathlib import Path

    from vit_pipeline.benchmark.docs import render

    root = Path(__file__).resolve().parents[2]
    page = render(root / "docs" / "benchmarks")
    assert "| backend | provider | variant | precision |" in page  # the inference report
    assert "Peak memory (VmHWM of a fresh process)" in page  # the large-folder report, its own markdown
    assert page == (root / "docs" / "benchmarks.md").read_text()  # the committed page is not edited by hand
    # Each about.md's links work where it is read: in its folder, and (moved) on the page beside them.
    import re

    for link in re.findall(r"\]\(([^)#:\s]+)\)", page):
        assert (root / "docs" / link).exists(), link
    for about in (root / "docs" / "benchmarks").glob("*/about.md"):
        for link in re.findall(r"\]\(([^)#:\s]+)\)", about.read_text()):
            assert (about.parent / link).exists(), (about, link)


def test_benchmark_docs_refuses_an_empty_folder_rather_than_write_an_empty_page(tmp_path):
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    page = tmp_path / "benchmarks.md"
    page.write_text("the committed page")
    (tmp_path / "reports").mkdir()
    result = CliRunner().invoke(
        main, ["benchmark-docs", "--reports", str(tmp_path / "reports"), "--output", str(page)]
    )
    assert result.exit_code == 1 and "No report folders in" in result.output
    assert page.read_text() == "the committed page"
    # A folder beside real ones with none of the files a section is made of: a bare heading on the page.
    (tmp_path / "reports" / "1-real").mkdir()
    (tmp_path / "reports" / "1-real" / "about.md").write_text("## Real")
    (tmp_path / "reports" / "2-empty").mkdir()
    result = CliRunner().invoke(
        main, ["benchmark-docs", "--reports", str(tmp_path / "reports"), "--output", str(page)]
    )
    assert result.exit_code == 1 and "Report folders with none of about.md" in result.output, result.output
    assert "2-empty" in result.output and "1-real" not in result.output.split(":")[-1]
    assert page.read_text() == "the committed page"


def test_finetune_optimizer_ratios_pair_the_rows_of_each_round():
    from vit_pipeline.benchmark.training import TrainingReport, TrainingRow, optimizer_ratios

    def row(optimizer, index, first, p50):
        return TrainingRow("finetune", False, "float32", 128, 5, compute_ips=128 / p50 * 1000, step_ms_p50=p50,
                           data_ips=1e4, compile_seconds=first, optimizer=optimizer, round=index)  # fmt: skip

    rows = [row("preset", 0, 10.0, 1000), row("finetune", 0, 12.0, 1000),  # 1.2x first step
            row("finetune", 1, 11.0, 2000), row("preset", 1, 10.0, 1000),  # 1.1x, a slow step
            row("preset", 2, 10.0, 1000), row("finetune", 2, 9.0, 1000),  # 0.9x
            row("preset", 3, 1.0, 1.0)]  # fmt: skip  # a round without its pair is left out
    report = TrainingReport({}, rows, {"steps": 5, "steps_per_epoch": 3})
    q = optimizer_ratios(report)
    assert q["rounds"] == 3
    assert q["first_step"] == pytest.approx(1.1)
    assert q["step_p50"] == pytest.approx(1.0)
    # Epochs of 3 steps: (12+2)/(10+2), (11+4)/(10+2), (9+2)/(10+2) -> median 14/12.
    assert q["first_epoch"] == pytest.approx(14 / 12)
    assert "first step 1.10x, step p50 1.00x, first epoch of 3 steps 1.17x" in report.to_markdown()
    with pytest.raises(ValueError, match="Expected at least one round with both optimizers"):
        optimizer_ratios(TrainingReport({}, rows[-1:], {"steps_per_epoch": 3}))


def test_names_people_read_say_the_precision_a_row_ran_in():
    """OpenVINO as it comes runs the fp32 file in bf16 on a bf16 CPU: no metric, ratio or tag may call it fp32."""
    from vit_pipeline.benchmark.report import OV_DEFAULT, OV_F32, BenchmarkResult, LatencyStats

    lat = LatencyStats(1.0, 1.0, 1.0, 1.0, 1.0, 0.0)

    def row(backend, provider, variant, precision, ips):
        return BenchmarkResult(
            backend, provider, variant, 1, lat, ips, 10, top1_agreement=1.0, precision=precision
        )

    rows = [row("keras", "tensorflow", "fp32", "fp32", 100.0),
            row("onnxruntime", "CPUExecutionProvider", "optimized", "fp32", 150.0),
            row("onnxruntime", "CPUExecutionProvider", "int8-static", "int8", 160.0),
            row("openvino", OV_DEFAULT, "fp32", "bf16", 180.0),
            row("openvino", OV_F32, "fp32", "fp32", 120.0),
            row("openvino", OV_DEFAULT, "optimized", "bf16", 200.0)]  # fmt: skip
    report = BenchmarkReport({}, rows, settings={"batch_sizes": [1]}, choice={"label": "openvino/optimized"})
    metrics = report.mlflow_metrics()
    assert "bench_openvino_openvino_cpu_fp32_as_bf16_b1_ips" in metrics
    assert "bench_openvino_openvino_cpu_optimized_as_bf16_b1_ips" in metrics
    assert "agreement_openvino_cpu_fp32_as_bf16" in metrics
    assert not {k for k in metrics if k.startswith("bench_openvino_openvino_cpu_fp32_b")}  # the untrue name
    # Rows that ran in their file's precision keep their names.
    assert {"bench_openvino_openvino_cpu_f32_fp32_b1_ips", "bench_onnxruntime_cpu_optimized_b1_ips",
            "bench_onnxruntime_cpu_int8_static_b1_ips", "bench_keras_tensorflow_fp32_b1_ips"} <= set(metrics)  # fmt: skip
    ratios = report.ratios()
    assert "batch 1: openvino/fp32 (ran in bf16) / Keras = 1.80x" in ratios
    assert "batch 1: served openvino/optimized (ran in bf16) / OpenVINO f32 = 1.67x" in ratios
    assert "Served candidate: **openvino/optimized (ran in bf16)**" in report.to_markdown()
    assert report.served(1).label == "openvino/optimized"  # the identifier is unchanged


def test_benchmark_inputs_that_cannot_work_are_one_line_and_write_nothing(tmp_path):
    """Tracebacks (a bad npz, a zip that is no Keras model, two inputs, a 10-class model on 100-class data) and
    empty output folders; a batch size of 11 digits ran into the OOM killer, "1,,64" read as [1, 64]."""
    from click.testing import CliRunner

    from tests.code.test_consumer import _not_a_classifier
    from tests.conftest import CIFAR_CUT, constant_classifier
    from vit_pipeline.cli import main

    ten = constant_classifier(tmp_path / "ten.onnx", 10, 0)
    (tmp_path / "bad.npz").write_text("not an npz")
    (tmp_path / "garbage.keras").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip
    two = _not_a_classifier(tmp_path / "two.onnx", "two inputs")
    quick = ["--variants", "fp32", "--no-memory", "--no-openvino", "--seconds", "0.01", "--rounds", "1"]
    cases = [
        ([str(ten), "--eval-data", str(tmp_path / "bad.npz")], "Cannot read --eval-data"),
        ([str(ten), "--eval-data", str(CIFAR_CUT)], "predicts 10 classes; --eval-data labels go up to 99"),
        (["--keras", str(tmp_path / "garbage.keras")], "is not a loadable Keras model"),
        ([str(two)], "is not an image classifier: Expected one input [batch, H, W, 3]"),
        ([str(ten), "--batch-sizes", "1,,64"], "Expected batch sizes from 1 to 4096"),
        ([str(ten), "--batch-sizes", "99999999999"], "Expected batch sizes from 1 to 4096"),
        (["--preset", "nope"], "nope"),
    ]
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(
        main, ["benchmark", str(ten), *quick, "--output", str(tmp_path / "afile" / "r.json")]
    )
    assert result.exit_code == 1 and "afile is a file, not a folder" in result.output, result.output[-1000:]
    (tmp_path / "tb.json").write_text("[1, 2]")
    result = CliRunner().invoke(
        main, ["train-benchmark", "--rerun-failed", "--output", str(tmp_path / "tb.json")]
    )
    assert result.exit_code == 1 and "Cannot read" in result.output and "Traceback" not in result.output
    for args, says in cases:
        out = tmp_path / "out" / "r.json"
        result = CliRunner().invoke(main, ["benchmark", *args, *quick, "--output", str(out)])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code != 0 and len(errors) == 1 and says in errors[0], (args, result.output[-1500:])
        assert "Traceback" not in result.output and not out.parent.exists(), args
