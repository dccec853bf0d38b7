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
        assert config["dynamicBatching"]["maxQueueDelayMicroseconds"] == "2000"
        assert config["instanceGroup"][0]["kind"] == kind
        assert config["versionPolicy"]["specific"]["versions"] == [reg.version]

    (isvc,) = yaml.safe_load_all((out / "kserve" / "inferenceservice.yaml").read_text())
    _check_fields(isvc, "V1beta1InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "onnx"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/triton" and isvc["metadata"]["name"] == "vit-pets"

    from kubernetes.client import ApiClient

    deployment, service, autoscaler = yaml.safe_load_all((out / "kubernetes" / "consumer.yaml").read_text())
    for doc, kind in ((deployment, "V1Deployment"), (service, "V1Service"),
                      (autoscaler, "V2HorizontalPodAutoscaler")):  # fmt: skip
        _round_trip(ApiClient(), doc, kind)
        _check_fields(doc, kind)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["args"][:2] == ["--model", "models:/vit-pets@champion"]
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


def test_a_file_that_is_not_an_export_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    result = CliRunner().invoke(main, ["export-serving", str(bad), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert (
        result.output.startswith("Error: Cannot export") and "\n(details: " in result.output
    )  # the CLI's one-line form
    assert not (tmp_path / "out").exists()


def test_publish_writes_a_version_only_when_the_champion_moves(registered, tmp_path):
    """The schedule's flow: the same champion twice publishes once; a new champion adds its version folder."""
    from vit_pipeline.flows.publish_serving import publish_serving

    uri, _ = registered
    out = tmp_path / "serving"
    first = publish_serving.fn("models:/vit-pets@champion", str(out), tracking_uri=uri)
    assert first["published"] and first["version"] == "1"
    stamp = (out / "triton" / "vit-pets" / "config.pbtxt").stat().st_mtime_ns
    again = publish_serving.fn("models:/vit-pets@champion", str(out), tracking_uri=uri)
    assert not again["published"] and "already in" in again["reason"]
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
