"""``vit-pipeline export-serving``: a Triton repository and KServe/Kubernetes manifests that validate.

Each output is checked against its own schema: ``config.pbtxt`` parsed by Triton's
``model_config`` protobuf (shipped by ``tritonclient``), the manifests loaded through the
``kserve`` and ``kubernetes`` Python API models (and written back: no field may be lost).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import constant_classifier, labelled_split
from vit_pipeline import registry, runs
from vit_pipeline.cli import main
from vit_pipeline.config import make_config
from vit_pipeline.errors import PipelineError

pytestmark = pytest.mark.integration  # a real MLflow registry

# In its own process: tritonclient.grpc's protos and kserve's share the "inference" package name, and
# protobuf refuses the second in one descriptor pool.
PARSE_PBTXT = """
import json, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
config = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())
print(json_format.MessageToJson(config))
"""


def _round_trip(api_client, doc: dict, kind: str) -> None:
    """Loads ``doc`` as the API model ``kind`` and writes it back: unknown or misspelt fields vanish."""
    model = api_client.deserialize(json.dumps(doc), kind, "application/json")
    assert type(model).__name__ == kind
    assert api_client.sanitize_for_serialization(model) == doc


def _model_class(name: str):
    import kserve.models
    import kubernetes.client.models

    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name)


def _check_fields(doc, kind: str, where: str = "") -> None:
    """Every key of ``doc`` is a field of the API model ``kind`` (kserve's, or the Kubernetes ones it names),
    recursively, with the value's shape that field declares. (kserve's own ``ApiClient.deserialize`` cannot
    read the Kubernetes types it names, and ignores unknown keys silently.)"""
    import re

    klass = _model_class(kind)
    fields = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    assert isinstance(doc, dict), f"{where or kind}: expected an object"
    for key, value in doc.items():
        assert key in fields, f"{where or kind}: {kind} has no field {key!r}"
        declared = klass.openapi_types[fields[key]]
        path = f"{where}.{key}" if where else key
        if m := re.fullmatch(r"(?:list\[|List\[)(.+)\]", declared):
            assert isinstance(value, list), path
            for item in value:
                _check_value(item, m[1], path)
        else:
            _check_value(value, declared, path)


def _check_value(value, declared: str, path: str) -> None:
    import re

    if re.fullmatch(r"(dict\(|Dict\[).*", declared):
        assert isinstance(value, dict), path
    elif declared in ("str", "int", "bool", "float", "object", "datetime"):
        assert declared == "object" or not isinstance(value, dict | list), path
    else:
        _check_fields(value, declared, path)


@pytest.fixture
def registered(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_config("quickstart", {"tracking_uri": uri, "registered_model_name": "vit-pets"})
    names = ["cat", "dog", "eel"]
    split = labelled_split([4, 4, 4])
    split = registry.TestSplit(split.images, split.labels, names, "d")
    onnx = constant_classifier(tmp_path / "c.onnx", 3, 1, names)
    result = registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(onnx), split)
    assert result.promoted
    return uri, result


def test_triton_repository_and_manifests_validate(registered, tmp_path):
    uri, reg = registered
    out = tmp_path / "serving"
    result = CliRunner().invoke(main, ["export-serving", "models:/vit-pets@champion", str(out), "--tracking-uri", uri,
                                       "--max-batch-size", "32", "--storage-uri", "s3://models/triton"])  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = out / "triton" / "vit-pets"
    assert (folder / reg.version / "model.onnx").stat().st_size > 0
    assert (folder / "labels.txt").read_text().splitlines() == ["cat", "dog", "eel"]
    for config_file, kind in (
        (folder / "config.pbtxt", "KIND_CPU"),
        (folder / "configs" / "gpu.pbtxt", "KIND_GPU"),
    ):
        parsed = subprocess.run([sys.executable, "-c", PARSE_PBTXT, str(config_file)], capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert parsed.returncode == 0, parsed.stderr[-2000:]
        config = json.loads(parsed.stdout)
        assert config["name"] == "vit-pets" and config["platform"] == "onnxruntime_onnx"
        assert config["maxBatchSize"] == 32
        assert config["input"] == [{"name": "images", "dataType": "TYPE_FP32", "format": "FORMAT_NHWC",
                                    "dims": ["32", "32", "3"]}]  # fmt: skip
        assert config["output"] == [{"name": "logits", "dataType": "TYPE_FP32", "dims": ["3"],
                                     "labelFilename": "labels.txt"}]  # fmt: skip
        # No preferred sizes: with 1 among them Triton would send every request alone.
        assert config["dynamicBatching"] == {"maxQueueDelayMicroseconds": "2000"}
        assert config["instanceGroup"][0]["kind"] == kind
        assert config["versionPolicy"]["specific"]["versions"] == [reg.version]
        threads = config["parameters"].get("intra_op_thread_count")
        assert threads == (
            {"stringValue": "2"} if kind == "KIND_CPU" else None
        )  # 2 instances x 2 = the limit
        assert config["parameters"]["source"] == {"stringValue": "models:/vit-pets@champion"}

    assert (
        "&id" not in (out / "kubernetes" / "vit-pets-consumer.yaml").read_text()
    )  # no YAML anchors to patch
    (isvc,) = yaml.safe_load_all((out / "kserve" / "vit-pets.yaml").read_text())
    _check_fields(isvc, "V1beta1InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "onnx"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/triton" and isvc["metadata"]["name"] == "vit-pets"
    assert model["runtime"] == "kserve-tritonserver"  # not OpenVINO's, which also takes onnx

    from kubernetes.client import ApiClient

    deployment, service, autoscaler = yaml.safe_load_all(
        (out / "kubernetes" / "vit-pets-consumer.yaml").read_text()
    )
    for doc, kind in ((deployment, "V1Deployment"), (service, "V1Service"),
                      (autoscaler, "V2HorizontalPodAutoscaler")):  # fmt: skip
        _round_trip(ApiClient(), doc, kind)
        _check_fields(doc, kind)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["args"][:2] == ["--model", "models:/vit-pets@champion"]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300
    assert "replicas" not in deployment["spec"]  # the autoscaler's
    assert "volumes" not in deployment["spec"]["template"]["spec"]  # the registry's files, fetched
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_served_file_in_the_repository_answers_like_the_registered_one(registered, tmp_path):
    import onnxruntime as ort

    from tests.conftest import real_images
    from vit_pipeline.serving_export import export_serving

    uri, reg = registered
    written = export_serving("models:/vit-pets/1", tmp_path / "s", uri)
    assert written["version"] == "1" and written["name"] == "vit-pets"
    session = ort.InferenceSession(str(Path(written["triton"]) / "1" / "model.onnx"))
    logits = session.run(["logits"], {"images": real_images(2).astype(np.float32)})[0]
    assert logits.shape == (2, 3) and (logits.argmax(1) == 1).all()


def test_a_file_source_is_served_from_the_published_volume_and_names_are_dns_labels(tmp_path):
    from kubernetes.client import ApiClient

    from vit_pipeline.serving_export import _slug, export_serving

    onnx = constant_classifier(tmp_path / 'x"y\\z.onnx', 3, 1, ["cat", "dog", "eel"])
    written = export_serving(str(onnx), tmp_path / "s")
    parsed = subprocess.run([sys.executable, "-c", PARSE_PBTXT, str(Path(written["triton"]) / "config.pbtxt")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert parsed.returncode == 0, parsed.stderr[-2000:]  # a quote and a backslash in the source, escaped
    assert json.loads(parsed.stdout)["parameters"]["source"] == {"stringValue": str(onnx)}
    deployment = next(yaml.safe_load_all(Path(written["kubernetes"]).read_text()))
    _round_trip(ApiClient(), deployment, "V1Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][1] == f"/models/triton/{written['name']}/1/model.onnx"
    assert container["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]
    assert pod["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "vit-models",
                                                                          "readOnly": True}}]  # fmt: skip
    assert "note" not in written or "volume claim" not in written["note"]
    # The storage URI's own claim and folder (the default claim was mounted whatever it said: pods Pending).
    written = export_serving(str(onnx), tmp_path / "t", storage_uri="pvc://team-models/serving/triton")
    pod = next(yaml.safe_load_all(Path(written["kubernetes"]).read_text()))["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][1] == f"/models/serving/triton/{written['name']}/1/model.onnx"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "team-models"
    # Object storage: the consumer cannot read it; said so.
    written = export_serving(str(onnx), tmp_path / "u", storage_uri="s3://bucket/triton")
    assert "read the published file from the volume claim 'vit-models'" in written["note"]
    import re

    for name in ("2024 Flowers", "x" * 80, "a" * 39 + "_b", "Vit_Pets", "___"):
        slug = _slug(name)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", slug) and len(slug) <= 40, (name, slug)


def test_a_file_that_is_not_an_export_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    result = CliRunner().invoke(main, ["export-serving", str(bad), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert (
        result.output.startswith("Error: Cannot export") and "\n(details: " in result.output
    )  # the CLI's one-line form
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--storage-uri", "models/triton", "Expected a storage URI with a scheme"),
        ("--storage-uri", "s3://bucket/with space", "Expected a storage URI with a scheme"),
        ("--consumer-image", "Vit-Consumer:latest", "Expected a container image reference"),
        ("--consumer-image", "vit consumer", "Expected a container image reference"),
        ("--consumer-image", "vit-consumer:", "Expected a container image reference"),
        # The pods read the registry over HTTP: this machine's store is nothing they can open.
        ("--consumer-tracking-uri", "sqlite:///vit-runs/mlflow.db", "Expected --consumer-tracking-uri"),
        ("--consumer-tracking-uri", "mlflow:5000", "Expected --consumer-tracking-uri"),
    ],
)
def test_manifest_values_a_cluster_would_refuse_are_refused_before_anything_is_written(
    tmp_path, option, value, expected
):
    result = CliRunner().invoke(main, ["export-serving", "models:/vit@champion", str(tmp_path / "out"), option,
                                       value])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {expected}") and repr(value) in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_deployable_values_pass_the_checks():
    from vit_pipeline.serving_export import _check_options

    for uri in ("pvc://vit-models/triton", "s3://b/k", "gs://b/k", "hf://org/m", "kit://custom/scheme"):
        _check_options(64, 2000, uri, "vit-consumer:latest", None)
    for image in ("ghcr.io/acme/vit-consumer:1.2", "localhost:5000/vit:v1", "vit@sha256:" + "a" * 64):
        _check_options(64, 2000, None, image, None)
    for uri in ("http://mlflow:5000", "https://mlflow.example.com/prefix", "HTTP://MLflow:5000", ""):
        _check_options(64, 2000, None, "vit-consumer:latest", uri)


def test_publish_writes_a_version_only_when_the_champion_moves(registered, tmp_path):
    """The schedule's flow: the same champion twice publishes once; a new champion adds its version folder."""
    from vit_pipeline.flows.publish_serving import publish_serving

    uri, _ = registered
    out = tmp_path / "serving"
    first = publish_serving.fn("models:/vit-pets@champion", str(out), tracking_uri=uri)
    assert first["published"] and first["version"] == "1"
    stamp = (out / "triton" / "vit-pets" / "config.pbtxt").stat().st_mtime_ns
    again = publish_serving.fn("models:/vit-pets@champion", str(out), tracking_uri=uri)
    assert not again["published"] and "already served" in again["reason"]
    assert (out / "triton" / "vit-pets" / "config.pbtxt").stat().st_mtime_ns == stamp  # nothing rewritten
    # A second version becomes the champion (same accuracy: the policy promotes it).
    cfg = make_config("quickstart", {"tracking_uri": uri, "registered_model_name": "vit-pets"})
    names = ["cat", "dog", "eel"]
    split = labelled_split([4, 4, 4])
    onnx = constant_classifier(tmp_path / "c2.onnx", 3, 1, names)
    second = registry.register_onnx(cfg, runs.create_run(cfg, "test"),  str(onnx),
                                    registry.TestSplit(split.images, split.labels, names, "d"))  # fmt: skip
    assert second.promoted and second.version == "2"
    moved = publish_serving.fn("models:/vit-pets@champion", str(out), tracking_uri=uri)
    assert moved["published"] and moved["version"] == "2"
    assert {p.name for p in (out / "triton" / "vit-pets").iterdir() if p.is_dir()} >= {"1", "2"}


def _set_champion(uri: str, name: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).set_registered_model_alias(name, "champion", version)


def test_publish_follows_a_rollback_and_a_name_that_is_not_a_slug(tmp_path):
    """The champion set back to an earlier version is served again (its folder exists already); a registered
    name that is not a DNS label (``Vit_Pets``) keeps its name in Triton (the consumer's v2 name too), its
    Kubernetes objects are ``vit-pets``, and the consumer's manifest follows the alias itself."""
    from vit_pipeline.serving_export import publish, served_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_config("quickstart", {"tracking_uri": uri, "registered_model_name": "Vit_Pets"})
    names = ["cat", "dog", "eel"]
    split = labelled_split([4, 4, 4])
    split = registry.TestSplit(split.images, split.labels, names, "d")
    for i in (1, 2):
        onnx = constant_classifier(tmp_path / f"c{i}.onnx", 3, 1, names)
        assert registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(onnx), split).version == str(i)
    out = tmp_path / "serving"
    folder = out / "triton" / "Vit_Pets"
    for version in ("1", "2"):  # the champion moves from 1 to 2, each publish writes its version
        _set_champion(uri, "Vit_Pets", version)
        assert publish("models:/Vit_Pets@champion", out, uri)["version"] == version
        assert served_version(folder) == version
    _set_champion(uri, "Vit_Pets", "1")  # a rollback: the folder of 1 is there
    # Triton reloads a served version when a file of its folder changes: what is equal stays untouched.
    untouched = [folder / "labels.txt", folder / "1" / "model.onnx"]
    stamps = [f.stat().st_mtime_ns for f in untouched]
    back = publish("models:/Vit_Pets@champion", out, uri)
    assert [f.stat().st_mtime_ns for f in untouched] == stamps
    assert back["published"] and back["version"] == "1" and served_version(folder) == "1"
    assert "versions: [ 1 ]" in (folder / "configs" / "gpu.pbtxt").read_text()
    deployment = next(yaml.safe_load_all((out / "kubernetes" / "vit-pets-consumer.yaml").read_text()))
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][1] == "models:/Vit_Pets@champion"
    assert deployment["metadata"]["name"] == "vit-pets-consumer"
    assert not publish("models:/Vit_Pets@champion", out, uri)["published"]


# A publish in its own process. Its model copy writes half the file, then the process is SIGKILLed
# (the worst moment for a crash); or it waits for the barrier file, then publishes, holding the folder
# a second longer than the copy takes (so that two unserialised publishes would overlap).
PUBLISH = """
import json, os, shutil, signal, sys, time
from pathlib import Path
from vit_pipeline import serving_export

source, out, mode, go = sys.argv[1:5]
if mode == "crash":
    def half_then_sigkill(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.copyfile = half_then_sigkill
else:
    real = serving_export.export_serving
    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)
    serving_export.export_serving = slow
    Path(go + "." + str(os.getpid())).touch()  # ready
    while not Path(go).exists():
        time.sleep(0.001)
print(json.dumps(serving_export.publish(source, out)))
"""


def _publisher(source: Path, out: Path, mode: str, go: Path) -> subprocess.Popen:
    args = [sys.executable, "-c", PUBLISH, str(source), str(out), mode, str(go)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_first_publish_killed_mid_copy_leaves_no_model_folder_and_is_redone(tmp_path):
    """Triton loads an ONNX model folder without config.pbtxt too (it makes one up): a new model's folder
    appears whole or not at all."""
    from vit_pipeline.serving_export import STAGING, publish, served_version

    names = ["cat", "dog", "eel"]
    source = constant_classifier(tmp_path / "c.onnx", 3, 1, names)
    out = tmp_path / "serving"
    proc = _publisher(source, out, "crash", tmp_path / "unused")
    proc.communicate(timeout=120)
    assert proc.returncode == -9  # SIGKILL, mid-copy
    folder = out / "triton" / "c"  # the file's stem: no dataset in its metadata
    assert not folder.exists() and not list(out.glob("kserve/*.yaml")) and not list(out.glob("kubernetes/*"))
    assert len(list((out / STAGING / "c" / "1").glob(".model.onnx.*"))) == 1  # the half copy, not served
    redone = publish(str(source), out)
    assert redone["published"] and served_version(folder) == "1"
    assert (folder / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert [p.name for p in (folder / "1").iterdir()] == ["model.onnx"] and not (out / STAGING).exists()


def test_one_folder_serves_one_model_and_a_version_is_never_replaced(registered, tmp_path):
    """Names that make the same Kubernetes name, a file exported over a registered model of its name, and
    other bytes under a served version number are refused in one line; what was there stays."""
    from vit_pipeline.serving_export import export_serving, publish

    uri, _ = registered
    out = tmp_path / "serving"
    assert export_serving("models:/vit-pets@champion", out, uri)["name"] == "vit-pets"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".write.lock"}
    names = ["cat", "dog", "eel"]
    split = labelled_split([4, 4, 4])
    split = registry.TestSplit(split.images, split.labels, names, "d")
    for other in ("vit.pets", "Vit_Pets"):  # their own Triton folders, but the Kubernetes name vit-pets
        cfg = make_config("quickstart", {"tracking_uri": uri, "registered_model_name": other})
        onnx = constant_classifier(tmp_path / f"{other}.onnx", 3, 0, names)
        registry.register_onnx(cfg, runs.create_run(cfg, "test"), str(onnx), split)
        result = CliRunner().invoke(main, ["export-serving", f"models:/{other}@champion", str(out),
                                           "--tracking-uri", uri])  # fmt: skip
        assert result.exit_code == 1 and result.output.startswith(f"Error: {out / 'kserve' / 'vit-pets.yaml'} "
                                                                  "is 'models:/vit-pets@champion''s")  # fmt: skip
    # A file whose served name is the registered model's (the consumer would call it vit-pets too).
    stray = constant_classifier(tmp_path / "vit-pets.onnx", 3, 2, names)
    with pytest.raises(PipelineError, match=r"serves 'models:/vit-pets@champion', not '.*vit-pets.onnx'"):
        publish(str(stray), out)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".write.lock"}
    assert after == before
    # Other bytes under a version number Triton served: never, even from the same source.
    target = out / "triton" / "vit-pets" / "1" / "model.onnx"
    target.write_bytes(stray.read_bytes())
    with pytest.raises(PipelineError, match="holds another file than version 1 of 'models:/vit-pets/1'"):
        export_serving("models:/vit-pets/1", out, uri)
    assert target.read_bytes() == stray.read_bytes()


def test_a_model_folder_export_serving_did_not_write_is_left_as_it_is(tmp_path):
    """A team's own Triton folder of the same name (its config.pbtxt names no source), or a bare ONNX folder
    Triton configures itself, was taken over: its config and labels rewritten, its version no longer served."""
    source = constant_classifier(tmp_path / "vit-pets.onnx", 3, 1, ["cat", "dog", "eel"])
    for config in ('name: "vit-pets"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n', None):
        out = tmp_path / ("theirs" if config else "bare")
        folder = out / "triton" / "vit-pets"
        (folder / "3").mkdir(parents=True)
        (folder / "3" / "model.onnx").write_bytes(source.read_bytes())
        if config:
            (folder / "config.pbtxt").write_text(config)
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        result = CliRunner().invoke(main, ["export-serving", str(source), str(out)])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: {folder} was not written by export-serving")
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def _variant(path: Path, kind: str) -> Path:
    """The constant classifier with a fixed batch of 1, or uint8 images in: loadable, but not what Triton's ONNX
    Runtime backend accepts under a config with ``max_batch_size`` and FP32 (nor what the batcher can run)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    if kind == "static-batch":
        for value in (graph.input[0], graph.output[0]):
            value.type.tensor_type.shape.dim[0].ClearField("dim_param")
            value.type.tensor_type.shape.dim[0].dim_value = 1
    else:
        graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
        graph.node[0].input[0] = "pixels"
        graph.node.insert(0, helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT))
    onnx.checker.check_model(model)
    out = path.with_name(f"{kind}.onnx")
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize(
    ("kind", "message"),
    [("static-batch", "Expected a dynamic batch size"), ("uint8-in", "Received: uint8 in, float32 out")],
)
def test_a_file_triton_would_not_load_under_its_config_is_refused_by_export_and_the_consumer(
    tmp_path, kind, message
):
    from vit_consumer.classifier import InputError, OnnxClassifier

    bad = _variant(constant_classifier(tmp_path / "c.onnx", 3, 1, ["cat", "dog", "eel"]), kind)
    result = CliRunner().invoke(main, ["export-serving", str(bad), str(tmp_path / "out")])
    assert (
        result.exit_code == 1
        and result.output.startswith("Error: Cannot export")
        and message in result.output
    )
    assert not (tmp_path / "out" / "triton").exists()
    with pytest.raises(InputError, match=message):
        OnnxClassifier(bad)


def test_a_publish_that_fails_writing_its_manifests_serves_nothing_new_and_is_redone(tmp_path, monkeypatch):
    """The manifests come before config.pbtxt (what says a version is served): written after it, a publish
    that died between the two said "already served" for good, and the manifests never appeared."""
    from vit_pipeline import serving_export
    from vit_pipeline.serving_export import manifest_paths, publish, read_model, served_version

    source = constant_classifier(tmp_path / "c.onnx", 3, 1, ["cat", "dog", "eel"])
    out = tmp_path / "serving"
    real = serving_export.write_text

    def disk_full(path, text):
        if "kubernetes" in str(path):
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(serving_export, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        publish(str(source), out)
    assert not (out / "triton" / "c").exists()  # a new model: its folder never appeared
    monkeypatch.undo()
    assert publish(str(source), out)["published"]
    isvc, consumer = manifest_paths(out, read_model(str(source)))
    consumer.unlink()  # lost (or a repository written before manifests had one file per model)
    again = publish(str(source), out)
    assert (
        again["published"]
        and consumer.is_file()
        and isvc.is_file()
        and served_version(out / "triton" / "c") == "1"
    )
    assert not publish(str(source), out)["published"]


def test_a_file_is_the_same_model_whether_named_by_a_relative_or_an_absolute_path(tmp_path, monkeypatch):
    from vit_pipeline.serving_export import export_serving

    (tmp_path / "models").mkdir()
    source = constant_classifier(tmp_path / "models" / "c.onnx", 3, 1, ["cat", "dog", "eel"])
    monkeypatch.chdir(tmp_path / "models")
    first = export_serving("c.onnx", tmp_path / "serving")
    monkeypatch.chdir(tmp_path)
    again = export_serving(str(source), tmp_path / "serving")  # it was "another model" from here
    assert (first["name"], first["version"]) == (again["name"], again["version"]) == ("c", "1")
    assert json.dumps(str(source)) in (Path(again["triton"]) / "config.pbtxt").read_text()


def test_the_consumer_manifest_names_a_tracking_server_pods_can_reach(registered, tmp_path):
    from vit_pipeline.serving_export import export_serving

    uri, _ = registered

    def env(**kwargs):
        written = export_serving("models:/vit-pets@champion", tmp_path / "s", uri, **kwargs)
        deployment = next(yaml.safe_load_all(Path(written["kubernetes"]).read_text()))
        (variable,) = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        return variable["value"], written["note"]

    value, note = env()  # this machine's SQLite store
    assert value == "http://mlflow:5000" and note.startswith("the consumer's pods read the registry from")
    value, note = env(consumer_tracking_uri="https://mlflow.example.org")
    assert (value, note) == ("https://mlflow.example.org", "")
    from vit_pipeline import serving_export

    assert serving_export._consumer_tracking_uri(None, "http://127.0.0.1:5000")[0] == "http://mlflow:5000"
    assert serving_export._consumer_tracking_uri(None, "http://mlflow.internal:5000") == (
        "http://mlflow.internal:5000",
        "",
    )


def test_publishes_released_together_take_turns(tmp_path):
    """Two schedules publishing the same champion into one folder at once: one writes it, the other finds it."""
    import time

    source = constant_classifier(tmp_path / "c.onnx", 3, 1, ["cat", "dog", "eel"])
    out, go = tmp_path / "serving", tmp_path / "go"
    procs = [_publisher(source, out, "race", go) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.*"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                p.communicate() for p in procs if p.poll() is not None
            ]
            time.sleep(0.05)
        go.touch()
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr[-3000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert sorted(r["published"] for r in results) == [False, True], results
