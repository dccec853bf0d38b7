"""The train_pipeline flow on a real (test) Prefect server and a real MLflow SQLite store."""

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import CIFAR_CUT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_train_pipeline_logs_everything(prefect_server, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect import get_client

    from vit_pipeline.flows.train_pipeline import train_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {**tiny_overrides, "data_path": str(CIFAR_CUT), "tracking_uri": uri, "label_mode": "coarse",
                 "benchmark_batch_sizes": "1,4", "benchmark_seconds": 0.05, "benchmark_rounds": 1}  # fmt: skip
    result = train_pipeline(preset="cifar100", overrides=overrides)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "vit-cifar100-coarse"
    # Every config value is a param.
    params = run.data.params
    assert params["patch_size"] == "8" and params["mlp_head_units"] == "32"
    assert params["weight_decay"] == "0.1" and params["weight_decay_tfa_equivalent"] == "0.0001"
    assert params["data.num_classes"] == "20" and params["data.train_size"] == "270"
    assert len(params["data.digest"]) == 64
    # Headline and per-epoch metrics (one value per epoch).
    metrics = run.data.metrics
    assert (
        0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_top5_accuracy"] >= metrics["test_accuracy"]
    )
    assert metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "val_top5_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key  # epochs as people count them, as best_epoch
    val = client.get_metric_history(run.info.run_id, "val_accuracy")
    best = max(val, key=lambda m: (m.value, -m.step))  # the first epoch of the best value: the checkpoint's
    assert metrics["best_epoch"] == best.step and metrics["best_val_accuracy"] == pytest.approx(best.value)
    # Plots, CSVs and the model.
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    for name in ("per_class_accuracy.csv", "confusion_matrix.png", "learning_curves.png", "patches.png",
                 "per_class_metrics.json"):  # fmt: skip
        assert f"evaluation/{name}" in arts
    # The MLflow table holds the CSV's rows, one per class.
    got = tmp_path / "arts"
    got.mkdir()
    csv_path = client.download_artifacts(run.info.run_id, "evaluation/per_class_accuracy.csv", str(got))
    csv_rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    table_path = client.download_artifacts(run.info.run_id, "evaluation/per_class_metrics.json", str(got))
    table = json.loads(Path(table_path).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == len(csv_rows) == 20
    assert [(r["class_name"], r["support"], r["correct"]) for r in rows] == [
        (r["class_name"], int(r["support"]), int(r["correct"])) for r in csv_rows
    ]
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert any(m.source_run_id == run.info.run_id and m.name == "keras-model" for m in models)
    # Dataset input with its content digest.
    assert run.inputs.dataset_inputs[0].dataset.digest == params["data.digest"][:16]
    profile = json.loads(
        run.inputs.dataset_inputs[0].dataset.profile
    )  # the whole training split, not a sample
    assert profile["features_shape"][0] == profile["targets_shape"][0] == int(params["data.train_size"])
    # Prefect link both ways: tag on the MLflow run, markdown artifact in Prefect.
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    assert flow_run_id in run.data.tags["prefect.flow_run_url"]
    assert run.data.tags["prefect.flow_run_url"].startswith(
        ("http://", "https://")
    )  # a link, never "None/..."

    async def read_artifact():
        async with get_client() as pc:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            found = await pc.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-pipeline-summary"]))
            )
            return [a for a in found if str(a.flow_run_id) == flow_run_id]

    import asyncio

    artifacts = asyncio.run(read_artifact())
    assert artifacts and run.info.run_id in artifacts[0].data
    json.dumps(result)  # small, JSON-able result
    # Export passed the parity gate and the ONNX model is the registered champion.
    assert metrics["parity_top1_agreement"] == 1.0 and metrics["parity_max_abs_diff"] < 1e-3
    assert result["registry"]["promoted"] and run.data.tags["registry.decision"] == "promoted"
    champion = client.get_model_version_by_alias("vit-cifar100-coarse", "champion")
    assert champion.run_id == run.info.run_id
    # The decision used the served file's accuracy on the full test split; Keras' is recorded beside it.
    assert float(champion.tags["served_test_accuracy"]) == pytest.approx(
        result["registry"]["served_test_accuracy"]
    )
    assert float(champion.tags["keras_test_accuracy"]) == pytest.approx(result["test_accuracy"], abs=1e-6)
    assert champion.tags["test_images"] == params["data.test_size"]
    # The gates: outcomes as run tags, copied to the version; their figures and plots in the run.
    assert (
        run.data.tags["gate.data_validation"].startswith("passed")
        and "schema inferred" in (run.data.tags["gate.data_validation"])
    )
    assert champion.tags["gate.drift"] == run.data.tags["gate.drift"] == "not computed: no champion of " \
        "'vit-cifar100-coarse' yet"  # fmt: skip
    assert champion.tags["gate.calibration"].startswith("temperature ")
    assert metrics["temperature"] > 0 and metrics["test_ece"] >= 0 and "data.test_near_duplicates" in metrics
    data_arts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/statistics.json", "data/schema.json", "data/drift.json", "data/leakage.json",
            "data/channel_histograms.png"} <= data_arts  # fmt: skip
    assert {a.path for a in client.list_artifacts(run.info.run_id, "calibration")} == {
        "calibration/calibration.json", "calibration/reliability_diagram.png"}  # fmt: skip
    assert champion.tags["gate.robustness"].startswith("mean corruption accuracy")
    assert 0 <= metrics["robustness_mean_accuracy"] <= 1 and "robustness_jpeg_compression_accuracy" in metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "robustness")} == {
        "robustness/robustness.csv", "robustness/robustness.png", "robustness/corrupted_examples.png",
        "robustness/robustness_table.json"}  # fmt: skip
    # The consumer served the served file and the candidates before the alias moved.
    assert champion.tags["gate.infra_validation"].startswith("passed: the consumer served")
    assert metrics["infra_validation_passed"] == 1.0
    # The model card: a run artifact (Markdown and HTML) and the version's description.
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model_card")} == {
        "model_card/model_card.md", "model_card/model_card.html"}  # fmt: skip
    card_md = Path(
        client.download_artifacts(run.info.run_id, "model_card/model_card.md", str(got))
    ).read_text()
    for section in ("## Intended use", "## Data", "## Metrics", "## Calibration", "## Robustness",
                    "## Thresholds and release checks", "## Speed on the training machine", "## Lineage",
                    "## Limitations", "## Per class"):  # fmt: skip
        assert section in card_md, section
    assert f"Model card: vit-cifar100-coarse v{champion.version}" in card_md
    served = run.data.tags[
        "export.serve_variant"
    ]  # the served file's own parity figure, not the plain export's
    key = (
        f"parity_{served}_max_abs_diff"
        if f"parity_{served}_max_abs_diff" in metrics
        else "parity_max_abs_diff"
    )
    assert f"Export parity** of the served file, `{served}`" in card_md and f"{metrics[key]:.2e}" in card_md
    assert (
        f"{100 * metrics['temperature'] / 100:.3f}" in card_md
        and "snake" not in card_md.split("## Per class")[0]
    )
    assert (
        champion.description.startswith("# Model card: vit-cifar100-coarse v1")
        and len(champion.description) <= 5000
    )
    assert "## Per class" not in champion.description
    # The temperature travels in the served file's metadata, for the consumer's probabilities.
    from vit_consumer.classifier import OnnxClassifier

    served = OnnxClassifier(result["onnx_path"])
    assert served.temperature == pytest.approx(metrics["temperature"], rel=1e-5)
    # The run ended after its last stage, not when it was created.
    last_logged = max(m.timestamp for key in metrics for m in client.get_metric_history(run.info.run_id, key))
    assert run.info.end_time >= last_logged
    assert "models:/vit-cifar100-coarse/1" in artifacts[0].data
    # The served model is the fused graph, parity-gated too.
    assert run.data.tags["export.serve_variant"] == "optimized"
    assert metrics["parity_optimized_top1_agreement"] == 1.0
    # Benchmark: metrics per backend/provider/variant/batch, report artifacts, Prefect table.
    for key in ("bench_keras_tensorflow_fp32_b1_ips", "bench_onnxruntime_cpu_optimized_b4_ips",
                "bench_onnxruntime_cpu_int8_b1_p50_ms", "sgemm_roofline_gflops", "bench_served_b1_ips",
                "bench_served_b4_mean_ms"):  # fmt: skip
        assert metrics[key] > 0, key
    # Serving candidates: gated on real test images at export, registered inside the version when they pass.
    agreement = metrics["candidate_int8_static_top1_agreement"]
    passed = agreement >= 0.995
    assert run.data.tags["export.candidates"] == ("int8-static" if passed else "none")
    assert champion.tags["candidates"] == ("int8-static" if passed else "none")
    assert metrics["candidate_int8_static_size_mb"] < metrics["onnx_size_mb"]
    # The registered (fused) file's size, beside the plain export's: they differ.
    assert metrics["served_onnx_size_mb"] == pytest.approx(Path(result["onnx_path"]).stat().st_size / 2**20)
    assert metrics["served_onnx_size_mb"] != metrics["onnx_size_mb"]
    # Both logged models' pages carry the test figures (they were logged before evaluation and the decision).
    keras_logged = client.get_logged_model(run.data.tags["train.keras_model_uri"].removeprefix("models:/"))
    assert {m.key: m.value for m in keras_logged.metrics}["test_accuracy"] == pytest.approx(
        metrics["test_accuracy"]
    )
    assert run.data.tags["benchmark.served_choice"].split("/")[0] in ("onnxruntime", "openvino")
    # The served choice's row under one name whatever engine serves (runs compare in the runs table).
    rows = {k: v for k, v in metrics.items() if k.endswith("_b1_ips") and not k.startswith("bench_served")}
    (row,) = [k for k, v in rows.items() if v == metrics["bench_served_b1_ips"]]
    assert row.startswith(f"bench_{run.data.tags['benchmark.served_choice'].split('/')[0]}_"), row
    assert int(champion.tags["serving_gate_images"]) > 0  # the gate's images travel with the version
    assert metrics["int8_gemm_roofline_gflops"] > 0
    bench_arts = {a.path for a in client.list_artifacts(run.info.run_id, "benchmark")}
    assert bench_arts == {"benchmark/report.json", "benchmark/report.md", "benchmark/throughput.png"}
    assert any("onnxruntime/optimized / Keras" in line for line in result["benchmark"])

    async def read_table():
        async with get_client() as pc:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            found = await pc.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["inference-benchmark"]))
            )
            return [a for a in found if str(a.flow_run_id) == flow_run_id]

    (table,) = asyncio.run(read_table())
    assert table.type == "table" and "onnxruntime" in str(table.data)

    # Both models load the MLflow way in a fresh Python that imports nothing but mlflow.
    _check_mlflow_loading(uri, run.data.tags["train.keras_model_uri"], "models:/vit-cifar100-coarse@champion",
                          tmp_path)  # fmt: skip

    # The weekly flow: export and benchmark the registry's champion, no training.
    from vit_pipeline.flows.benchmark_champion import benchmark_champion

    bench = benchmark_champion(model_name="vit-cifar100-coarse", tracking_uri=uri, batch_sizes=[1, 2],
                               variants="fp32,optimized", seconds=0.05, rounds=1)  # fmt: skip
    assert bench["champion"]["run_id"] == run.info.run_id
    bench_run = client.get_run(bench["mlflow_run_id"])
    assert bench_run.info.status == "FINISHED"
    assert bench_run.data.tags["registry.model"] == "vit-cifar100-coarse/1"
    # Linked to its flow run, and the flow run's parameters name its store: a crashed or cancelled flow run
    # ends it KILLED (the hooks, end-crashed-runs); it stayed RUNNING.
    from vit_pipeline import runs

    assert bench_run.data.tags["prefect.flow_run_id"]
    assert runs.flow_run_config({"model_name": "m", "tracking_uri": uri}).tracking.tracking_uri == uri
    assert bench_run.data.metrics["bench_onnxruntime_cpu_optimized_b2_ips"] > 0
    # The report is named where it stays (its files went with the process's scratch folder).
    import mlflow

    report = mlflow.artifacts.download_artifacts(
        bench["report_path"], dst_path=str(tmp_path), tracking_uri=uri
    )
    assert bench["report_path"].startswith(f"runs:/{bench_run.info.run_id}/")
    assert json.loads(Path(report).read_text())["results"]


LOAD_CHECK = """
import json, sys
import numpy as np
import mlflow
heavy = sorted(m for m in ("tensorflow", "keras", "vit_pipeline.layers") if m in sys.modules)
mlflow.set_tracking_uri(sys.argv[1])
x = np.load(sys.argv[4])
keras_logits = mlflow.pyfunc.load_model(sys.argv[2]).predict(x)
raw = mlflow.pyfunc.load_model(sys.argv[2]).get_raw_model()  # the keras.Model behind the pyfunc
from vit_pipeline.layers import custom_objects
model = mlflow.keras.load_model(sys.argv[2], custom_objects=custom_objects())
assert type(raw).__name__ == type(model).__name__, (type(raw), type(model))
onnx_logits = mlflow.pyfunc.load_model(sys.argv[3]).predict(x)["logits"]
print(json.dumps({"heavy_at_import": heavy, "keras": np.asarray(keras_logits).tolist(),
                  "direct": np.asarray(model(x, training=False)).tolist(), "onnx": np.asarray(onnx_logits).tolist()}))
"""


def _check_mlflow_loading(uri, keras_uri, onnx_uri, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from tests.conftest import real_images

    x_path = tmp_path / "batch.npy"
    np.save(x_path, real_images(4).astype(np.float32))
    out = subprocess.run([sys.executable, "-c", LOAD_CHECK, uri, keras_uri, onnx_uri, str(x_path)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["heavy_at_import"] == []  # nothing heavy (no hook, no TensorFlow) at `import mlflow`
    keras_logits, onnx_logits = np.array(doc["keras"]), np.array(doc["onnx"])
    assert keras_logits.shape == (4, 20)
    np.testing.assert_allclose(np.array(doc["direct"]), keras_logits, atol=1e-5)
    np.testing.assert_allclose(onnx_logits, keras_logits, atol=1e-3)  # the registered ONNX model, same logits


def test_parity_gate_failure_fails_the_flow_and_registers_nothing(prefect_server, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    from vit_pipeline.export import ExportError
    from vit_pipeline.flows.train_pipeline import train_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # float32 noise alone (about 1e-6) exceeds this tolerance: the gate must refuse.
    overrides = {**tiny_overrides, "epochs": 1, "data_path": str(CIFAR_CUT), "tracking_uri": uri,
                 "serve_candidates": "optimized",
                 "parity_tolerance": 1e-12, "max_test_images": 100}  # fmt: skip
    with pytest.raises(ExportError, match="parity gate failed"):
        train_pipeline(preset="cifar100", overrides=overrides)
    client = MlflowClient(tracking_uri=uri)
    assert client.search_registered_models() == []
    (run,) = client.search_runs([client.get_experiment_by_name("vit-cifar100").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["export.parity"] == "failed"
    assert run.data.metrics["parity_max_abs_diff"] > 1e-12


def test_a_run_that_fails_after_its_registration_leaves_no_champion(
    prefect_server, tiny_overrides, tmp_path, monkeypatch
):
    """The last stage (the model card) failing, as a Ctrl-C there would: the promotion is withdrawn, the run FAILED."""
    from mlflow.tracking import MlflowClient

    from vit_pipeline import model_card
    from vit_pipeline.flows.train_pipeline import train_pipeline

    def broken(ctx, registration):
        raise RuntimeError("card broke")

    monkeypatch.setattr(model_card, "run", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {**tiny_overrides, "epochs": 1, "data_path": str(CIFAR_CUT), "tracking_uri": uri,
                 "max_test_images": 100, "benchmark_batch_sizes": "1", "robustness_images": 20}  # fmt: skip
    with pytest.raises(RuntimeError, match="card broke"):
        train_pipeline(preset="cifar100", overrides=overrides)
    client = MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name='vit-cifar100'")
    assert "promotion" not in version.tags and "card broke" in version.tags["withdrawn"]
    assert not client.get_registered_model("vit-cifar100").aliases
    run = client.get_run(version.run_id)
    assert run.info.status == "FAILED" and run.data.tags["registry.decision"] == "withdrawn"


def test_invalid_override_fails_before_any_run(prefect_server, tmp_path):
    from vit_pipeline.errors import ConfigError
    from vit_pipeline.flows.train_pipeline import train_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="patch_size=7"):
        train_pipeline(preset="cifar100", overrides={"patch_size": 7, "tracking_uri": uri})
    assert not (tmp_path / "mlflow.db").exists()


def test_a_fresh_install_s_schedules_have_nothing_to_do_and_say_so(prefect_server, tmp_path, monkeypatch):
    """Before the first training registers a champion, the weekly benchmark failed after three retries of the
    same answer and the hourly publish failed every hour: both complete, saying there is nothing to do."""
    from vit_pipeline import registry
    from vit_pipeline.flows.benchmark_champion import benchmark_champion
    from vit_pipeline.flows.publish_serving import publish_serving

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls = []
    real = registry.champion

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "champion", counted)
    bench = benchmark_champion(model_name="vit-nothing", tracking_uri=uri)
    assert bench == {
        "benchmarked": False,
        "reason": "No version of 'vit-nothing' holds the alias 'champion' (yet)",
    }
    assert len(calls) == 1  # not retried
    published = publish_serving("models:/vit-nothing@champion", str(tmp_path / "serving"), tracking_uri=uri)
    assert not published["published"] and published["reason"] == bench["reason"]
    assert not (tmp_path / "serving").exists()


def test_train_task_retries_only_when_tracking_was_down(prefect_server, monkeypatch):
    """The pipeline's own `train` task (its retries and retry condition; only the wait between tries is
    cut) around a stage that fails as told: an MLflow outage is retried, twice at most; a bug is not."""
    from prefect import flow

    from vit_pipeline.errors import TrackingUnavailable
    from vit_pipeline.flows import train_pipeline

    failures, calls = [], []

    def stage(ctx, data_path):  # stands in for the training stage the task calls
        calls.append(data_path)
        if failures:
            raise failures.pop(0)
        return "trained"

    monkeypatch.setattr(train_pipeline.train, "run", stage)
    train_task = train_pipeline.train_model.with_options(retry_delay_seconds=0)

    @flow
    def train_once(data_path: str) -> str:
        return train_task("ctx", data_path)

    def outage():
        return TrackingUnavailable("MLflow tracking server is unreachable")

    failures[:] = [outage()]
    assert train_once("down-once") == "trained"
    assert calls == ["down-once"] * 2
    calls.clear()
    failures[:] = [outage(), outage(), outage()]
    with pytest.raises(TrackingUnavailable):
        train_once("down-for-long")
    assert calls == ["down-for-long"] * 3  # the first try and two retries
    calls.clear()
    failures[:] = [ValueError("a bug: retrying would not help")]
    with pytest.raises(ValueError, match="a bug"):
        train_once("bug")
    assert calls == ["bug"]
    calls.clear()
    # MLflow's own errors: a refused value fails the same way again; a store that did not answer may not.
    from mlflow.exceptions import MlflowException

    failures[:] = [
        MlflowException("Changing param values is not allowed", error_code="INVALID_PARAMETER_VALUE")
    ]
    with pytest.raises(MlflowException, match="Changing param"):
        train_once("refused")
    assert calls == ["refused"]
    calls.clear()
    failures[:] = [MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with exception "
                                   "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded")]  # fmt: skip
    assert train_once("away") == "trained"
    assert calls == ["away"] * 2


def test_proxy_experiment_compares_both_presets_in_one_experiment(prefect_server, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    from vit_pipeline.flows.proxy_experiment import proxy_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {**tiny_overrides, "tracking_uri": uri, "label_mode": "coarse", "max_train_images": 200,
                 "benchmark_batch_sizes": "1", "benchmark_seconds": 0.05, "benchmark_variants": "fp32",
                 "serve_candidates": "optimized"}  # fmt: skip
    report = proxy_experiment(data_path=str(CIFAR_CUT), epochs=2, report_dir=str(tmp_path / "report"),
                              experiment_name="proxy-test", overrides=overrides)  # fmt: skip
    rows = report["rows"]
    assert [r["preset"] for r in rows] == ["cifar100", "cifar100-improved"]
    assert all(r["epochs"] == 2 and 0 <= r["test_accuracy"] <= 1 for r in rows)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "`cifar100-improved`" in table and rows[1]["run_id"] in table
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("proxy-test").experiment_id])
    assert {r.info.run_id for r in runs} == {r["run_id"] for r in rows}
    for run in runs:  # same seed and epochs, both exported through the parity gate
        assert run.data.params["seed"] == "42" and run.data.params["epochs"] == "2"
        assert run.data.tags["export.parity"] == "passed"
    improved = next(r for r in runs if r.data.params["preset"] == "cifar100-improved")
    assert (
        improved.data.params["attention_type"] == "lsa" and improved.data.params["label_smoothing"] == "0.1"
    )
    lr = [m.value for m in client.get_metric_history(improved.info.run_id, "learning_rate")]
    assert len(lr) == 2 and lr[1] < lr[0]  # the cosine schedule, logged per epoch
