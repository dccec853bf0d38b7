"""``vit-pipeline export-serving SOURCE DIR``: the champion, ready for an existing serving engine.

One consumer process serves one machine. Beyond that, teams deploy the model to an engine that
already scales: NVIDIA Triton, or KServe on Kubernetes (which runs Triton for ONNX models with
the v2 protocol). The contract is stated once (``vit_consumer.contract``: tensor names, the
metadata) and read from the file itself, so what is written here matches what was exported:

* ``DIR/triton/<name>/``: a Triton model repository entry. ``config.pbtxt`` is the whole
  contract (``platform: "onnxruntime_onnx"``, ``max_batch_size``, the input ``images`` FP32
  ``[H, W, 3]`` and the output ``logits`` FP32 ``[C]`` with ``labels.txt``, dynamic batching with
  a queue delay, CPU instances); ``configs/gpu.pbtxt`` is the same on GPU instances (Triton's
  ``--model-config-name=gpu``); ``<version>/model.onnx`` is the registered file (Triton needs
  integer version folders: the registry version).
* ``DIR/kserve/<k8s name>.yaml``: a KServe ``InferenceService`` (``modelFormat: onnx``,
  ``protocolVersion: v2``, ``storageUri`` where the ``triton/`` folder is uploaded).
* ``DIR/kubernetes/<k8s name>-consumer.yaml``: this project's consumer on Kubernetes: a Deployment (readiness
  and liveness probes on ``/health/ready`` and ``/health/live``, the model from the registry), a
  Service and a HorizontalPodAutoscaler.

The manifests are built from the Kubernetes and KServe API models' field names; the tests load
each back through the ``kubernetes`` / ``kserve`` Python models and ``config.pbtxt`` through
Triton's ``model_config`` protobuf.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit_pipeline.errors import PipelineError
from vit_pipeline.fsutil import atomic_path, scratch_root, write_text

CONSUMER_PORT = 8000
LOCK_SECONDS = 600  # a publish copies one model file: minutes at most
MAX_NAME = 40  # 63 (a DNS label) less the longest suffix Kubernetes and Knative add
CPU_INSTANCES, CPU_PER_INSTANCE = 2, 2  # Triton's CPU instances and the cores each may use (the limit: 4)
STAGING = ".staging"  # DIR/.staging/<name>: a new Triton model folder before it is renamed into DIR/triton
SOURCE_PARAMETER = re.compile(r'key: "source" value: \{ string_value: ("(?:[^"\\]|\\.)*") \}')
PVC = "vit-models"  # the volume claim that holds the published repository (storage URI and consumer mount)
DEFAULT_STORAGE_URI = f"pvc://{PVC}/triton"


@dataclass(frozen=True)
class ServedModel:
    """What the engines need to know of the registered file (read from its metadata).

    ``name`` is the name clients address (``contract.served_name``: the consumer's ``/v2/models/<name>``), the
    Triton model folder's; Kubernetes and KServe objects are named ``k8s_name``, a DNS label made of it.
    """

    name: str
    version: str
    path: Path
    input_shape: tuple[int, int, int]
    class_names: list[str]
    temperature: float
    source: str

    @property
    def k8s_name(self) -> str:
        return _slug(self.name)


def _identity(source: str) -> str:
    """Which model a source is, whatever its version or alias: ``models:/<name>``; every file source is one
    (a path says nothing of what the file is: the version folder's bytes decide, ``_fill``)."""
    registered = re.match(r"^models:/([^/@]+)", source)
    return f"models:/{registered[1]}" if registered else "a file"


def read_model(source: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> ServedModel:
    """The registered file behind ``source`` (``models:/name@alias``, ``models:/name/N`` or an ``.onnx`` file).

    Raises:
        PipelineError: not a vit-pipeline export, or the source cannot be fetched.
    """
    from vit_consumer import contract
    from vit_consumer.classifier import InputError, alias_version, resolve_model

    from vit_pipeline.export import ort_session

    registered = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))$", source)
    try:
        if registered:  # an alias is pinned first: the files and the version are the same version's
            version = alias_version(source, tracking_uri) if registered[2] else registered[3]
            path = resolve_model(f"models:/{registered[1]}/{version}", tracking_uri, dst)
        else:
            version, path = "1", resolve_model(source, tracking_uri, dst)
        session = ort_session(path)
        meta = session.get_modelmeta().custom_metadata_map
        names = contract.class_names(meta)
        if names is None:
            raise InputError(f"{path} has no class_names metadata; was it exported by vit-pipeline?")
        inputs, outputs = session.get_inputs(), session.get_outputs()
        # What Triton's ORT backend compares with the config (shapes, a dynamic batch, FP32): a file of others
        # would not load there.
        in_dims, out_dims, dtypes = contract.ort_io(session)
        if problem := contract.io_problem(in_dims, out_dims, len(names), dtypes):
            raise InputError(problem)
        if (inputs[0].name, outputs[0].name) != (contract.INPUT_NAME, contract.OUTPUT_NAME):
            raise InputError(f"Expected input {contract.INPUT_NAME!r} and output {contract.OUTPUT_NAME!r}. "
                             f"Received: {inputs[0].name!r}, {outputs[0].name!r}")  # fmt: skip
        shape = tuple(inputs[0].shape[1:])
        temperature = contract.temperature(meta)
    except Exception as exc:  # not loadable, not an export: one line either way
        raise PipelineError(f"Cannot export {source} for serving: {exc}") from None
    name = contract.served_name(source, meta, path)
    if not str(version).isdigit():
        raise PipelineError(f"Expected an integer registry version for Triton. Received: {version!r}")
    if name.startswith(".") or not name.isprintable():
        raise PipelineError(f"Expected a model name Triton can use as a folder name. Received: {name!r}")
    return ServedModel(name, str(version), Path(path), tuple(shape), names, temperature, source)


def _slug(name: str) -> str:
    """A name valid for KServe and Kubernetes objects (and manifest files): a DNS-1035 label (a letter first, then
    lower case, digits, '-', no '-' last) short enough for the suffixes added to it (``-consumer``,
    Knative's ``-predictor-00001``)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"vit-{slug}"
    return slug[:MAX_NAME].rstrip("-") or "vit-model"


# ------------------------------------------------------------------- Triton
def triton_config(model: ServedModel, max_batch_size: int, queue_delay_us: int, kind: str,
                  instances: int) -> str:  # fmt: skip
    """``config.pbtxt`` text (Triton's ``ModelConfig`` protobuf, text format)."""
    from vit_consumer import contract

    tensors = contract.triton_tensors(model.input_shape, len(model.class_names))
    # No preferred_batch_size: Triton sends a batch at once when its size is a preferred one, so with 1
    # among them every request would go alone; without, the queue delay lets batches form.
    threads = (
        f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{CPU_PER_INSTANCE}" }} }}\n'
        if kind == "KIND_CPU" else ""
    )  # fmt: skip  # ONNX Runtime's default, every core per instance, oversubscribes the instances
    return f"""# Written by vit-pipeline export-serving from {model.source!r} (version {model.version}).
# The contract of vit_consumer.contract: raw RGB pixels 0-255, NHWC; unnormalised logits.
# Probabilities: softmax(logits / {model.temperature:g}) (the calibrated temperature, in the parameters).
name: {json.dumps(model.name)}
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {_pbtxt(tensors["input"][0])}
]
output [
  {_pbtxt(tensors["output"][0])}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{ count: {instances} kind: {kind} }}
]
version_policy: {{ specific: {{ versions: [ {model.version} ] }} }}
{threads}parameters {{ key: "temperature" value: {{ string_value: "{model.temperature:g}" }} }}
parameters {{ key: "source" value: {{ string_value: {json.dumps(model.source)} }} }}
"""


def _pbtxt(tensor: dict[str, Any]) -> str:
    """One ``contract.triton_tensors`` entry in protobuf text format (enums bare, strings quoted)."""
    fields = []
    for key, value in tensor.items():
        if key == "dims":
            fields.append(f"dims: [ {', '.join(map(str, value))} ]")
        elif key in ("data_type", "format"):
            fields.append(f"{key}: {value}")
        else:
            fields.append(f"{key}: {json.dumps(value)}")
    return "{ " + " ".join(fields) + " }"


def write_triton(model: ServedModel, out: Path, max_batch_size: int, queue_delay_us: int,
                 before_served: Callable[[], None] | None = None) -> Path:  # fmt: skip
    """``out/<name>/`` with <version>/model.onnx, labels.txt, configs/gpu.pbtxt and, last, config.pbtxt.

    A new model's folder is built beside the repository and renamed into it whole: Triton loads an ONNX
    folder without a ``config.pbtxt`` too (it makes one up), so it must never see one half-written. In an
    existing folder every file is written atomically and ``config.pbtxt``, whose version policy names the new
    version, comes last: a crash part-way leaves the previous version served (``publish`` redoes it).
    ``before_served`` (the manifests) runs just before that last step, after every check.
    A folder serves one model (another model's folder is refused), and a version folder's file is never
    replaced by other bytes (a registry version is immutable; so is what Triton served under its number).
    """
    folder = out / model.name
    if folder.is_dir():
        _check_same_model(folder, model)
        _fill(folder, model, max_batch_size, queue_delay_us, before_served)
        return folder
    staging = out.parent / STAGING / model.name
    shutil.rmtree(staging, ignore_errors=True)
    _fill(staging, model, max_batch_size, queue_delay_us)
    if before_served is not None:
        before_served()
    out.mkdir(parents=True, exist_ok=True)
    os.rename(staging, folder)
    with contextlib.suppress(OSError):  # another new model's staging folder: left to it
        staging.parent.rmdir()
    return folder


def _check_same_model(folder: Path, model: ServedModel) -> None:
    """An existing folder is filled only if export-serving wrote it for the same model.

    A folder it writes always has a ``config.pbtxt`` with the ``source`` parameter (a new one is renamed into
    place whole): one without (a team's own, or a model Triton configures itself) was taken over.
    """
    config = folder / "config.pbtxt"
    found = SOURCE_PARAMETER.search(config.read_text(encoding="utf-8")) if config.is_file() else None
    if not found:
        raise PipelineError(f"{folder} was not written by export-serving (no config.pbtxt naming its source): "
                            "it is left as it is; export into another folder")  # fmt: skip
    if _identity(json.loads(found[1])) != _identity(model.source):
        raise PipelineError(f"{folder} serves {json.loads(found[1])!r}, not {model.source!r} (both are named "
                            f"{model.name!r} there): export into another folder")  # fmt: skip


def _fill(folder: Path, model: ServedModel, max_batch_size: int, queue_delay_us: int,
          before_config: Callable[[], None] | None = None) -> None:  # fmt: skip
    for stale in (
        *folder.glob(".*.tmp*"),
        *folder.glob("*/.*.tmp*"),
    ):  # what a crash cut short (writers take turns)
        stale.unlink()
    target = folder / model.version / "model.onnx"
    if target.is_file():
        if not filecmp.cmp(model.path, target, shallow=False):
            raise PipelineError(f"{target} holds another file than version {model.version} of {model.source!r}; "
                                "a served version is not replaced: export into another folder")  # fmt: skip
    else:
        with atomic_path(target) as tmp:  # Triton loads only "model.onnx"
            shutil.copyfile(model.path, tmp)
    _write_if_changed(folder / "labels.txt", "\n".join(model.class_names) + "\n")
    gpu = triton_config(model, max_batch_size, queue_delay_us, "KIND_GPU", 1)
    cpu = triton_config(model, max_batch_size, queue_delay_us, "KIND_CPU", CPU_INSTANCES)
    if before_config is not None:
        before_config()
    # Both configs move to the new version last, after the manifests: a crash before leaves both on the old
    # one (the GPU config moved first, and alone, before).
    _write_if_changed(folder / "configs" / "gpu.pbtxt", gpu)
    _write_if_changed(folder / "config.pbtxt", cpu)


def _write_if_changed(path: Path, text: str) -> None:
    """Triton reloads a served version when any file of its model folder changes: rewrite only what differs."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        write_text(path, text)


def served_version(folder: Path) -> str | None:
    """The version a repository entry's ``config.pbtxt`` serves (None: no complete entry)."""
    config = folder / "config.pbtxt"
    match = re.search(r"versions: \[ (\d+) \]", config.read_text()) if config.is_file() else None
    return match[1] if match and (folder / match[1] / "model.onnx").is_file() else None


# ------------------------------------------------------------------- manifests
def inference_service(model: ServedModel, storage_uri: str) -> dict[str, Any]:
    """A KServe v1beta1 InferenceService serving the Triton repository with the v2 protocol."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": model.k8s_name,
            "labels": {"app.kubernetes.io/part-of": "vit-pipeline"},
            "annotations": {"vit-pipeline/source": model.source, "vit-pipeline/version": model.version},
        },  # fmt: skip
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "maxReplicas": 4,
                "model": {
                    "modelFormat": {"name": "onnx"},
                    # Named: KServe's OpenVINO runtime also takes onnx, at a higher priority, and reads one model
                    # from the storage URI, not a Triton repository.
                    "runtime": "kserve-tritonserver",
                    "protocolVersion": "v2",
                    "storageUri": storage_uri,
                    "resources": {
                        "requests": {"cpu": "2", "memory": "2Gi"},
                        "limits": {"cpu": "4", "memory": "4Gi"},
                    },
                },
            }
        },
    }


def published_volume(storage_uri: str) -> tuple[str, str]:
    """The volume claim the consumer's pods read a published file from, and the repository's folder in it:
    the storage URI's own where it is a claim (``pvc://<claim>/<folder>``), else the default claim's."""
    if m := re.fullmatch(r"pvc://([^/]+)/?(.*)", storage_uri):
        return m[1], m[2].strip("/")
    return PVC, "triton"


def consumer_manifests(model: ServedModel, image: str, tracking_uri: str, storage_uri: str = DEFAULT_STORAGE_URI
                       ) -> list[dict[str, Any]]:  # fmt: skip
    """Deployment, Service and HorizontalPodAutoscaler of the consumer serving ``model.source``."""
    labels = {"app.kubernetes.io/name": "vit-consumer", "app.kubernetes.io/instance": model.k8s_name}
    name = f"{model.k8s_name}-consumer"
    # The registry source as given (an alias is followed: --reload-seconds), else the published file, from the
    # volume that holds the repository (the KServe storage URI's claim: the default one by default).
    registered = model.source.startswith("models:/")
    claim, folder = published_volume(storage_uri)
    published = "/".join(p for p in ("/models", folder, model.name, model.version, "model.onnx") if p)
    source = model.source if registered else published
    probe = {"periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3}
    container = {
        "name": "consumer",
        "image": image,
        "args": [
            "--model",
            source,
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(CONSUMER_PORT),
            "--reload-seconds",
            "60",
        ],  # fmt: skip
        "env": [{"name": "VIT_TRACKING_URI", "value": tracking_uri}],
        "ports": [{"name": "http", "containerPort": CONSUMER_PORT}],
        # The port opens only once the model is fetched and its candidates timed (a minute or more on 2 cores):
        # the startup probe holds the liveness probe back until then (up to 10 minutes), so it cannot loop.
        "startupProbe": {
            "httpGet": {"path": "/health/live", "port": "http"},
            **probe,
            "failureThreshold": 60,
        },
        "readinessProbe": {"httpGet": {"path": "/health/ready", "port": "http"}, **probe},
        "livenessProbe": {"httpGet": {"path": "/health/live", "port": "http"}, **probe},
        "resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
    }
    pod: dict[str, Any] = {"containers": [container]}
    if not registered:
        container["volumeMounts"] = [{"name": "models", "mountPath": "/models", "readOnly": True}]
        pod["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": {"vit-pipeline/source": model.source}},
        # No replicas: the autoscaler owns the count (a re-applied manifest would reset it otherwise).
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },  # fmt: skip
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": 2,
            "maxReplicas": 10,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],  # fmt: skip
        },
    }
    return [deployment, service, autoscaler]


def _yaml(documents: list[dict[str, Any]]) -> str:
    import yaml

    return "---\n".join(yaml.dump(d, Dumper=_plain_dumper(), sort_keys=False) for d in documents)


@functools.cache
def _plain_dumper():
    """yaml's safe dumper without &id001 anchors where a dict appears twice (labels): patchable as written."""
    import yaml

    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return Plain


def export_serving(source: str, out_dir: str | Path, tracking_uri: str | None = None, *, storage_uri: str | None = None,
                   consumer_image: str = "vit-consumer:latest", max_batch_size: int = 64,
                   queue_delay_us: int = 2000, consumer_tracking_uri: str | None = None) -> dict[str, str]:  # fmt: skip
    """Writes the Triton repository and the KServe and Kubernetes manifests; returns their paths (and a note)."""
    _check_options(max_batch_size, queue_delay_us, storage_uri, consumer_image, consumer_tracking_uri)
    with tempfile.TemporaryDirectory(prefix="vit-export-", dir=scratch_root()) as download:
        model = read_model(source, tracking_uri, download)
        with _one_writer(Path(out_dir)):
            return _write_all(model, Path(out_dir), tracking_uri, storage_uri, consumer_image, max_batch_size,
                              queue_delay_us, consumer_tracking_uri)  # fmt: skip


# KServe matches a storage URI by its scheme (gs://, s3://, pvc://, hf://, https://, or a custom
# ClusterStorageContainer's): whatever the scheme, it must have one.
_STORAGE_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S+")
# A container image reference as Docker parses it: [registry[:port]/]lowercase/path[:tag][@sha256:digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?"
)


def _check_options(
    max_batch_size: int, queue_delay_us: int, storage_uri: str | None, consumer_image: str,
    consumer_tracking_uri: str | None,
) -> None:  # fmt: skip
    """What the manifests would carry into a cluster that refuses it, refused here (one line each)."""
    if consumer_tracking_uri and not re.fullmatch(
        r"https?://[^\s/]+\S*", consumer_tracking_uri, re.IGNORECASE
    ):
        # The pods read the registry over HTTP: a path or a sqlite:/// URI is this machine's.
        raise PipelineError("Expected --consumer-tracking-uri to be an MLflow server's http:// or https:// URL. "
                            f"Received: {consumer_tracking_uri!r}")  # fmt: skip
    if max_batch_size < 1 or queue_delay_us < 0:
        raise PipelineError(f"Expected max_batch_size >= 1 and queue_delay_us >= 0. Received: {max_batch_size}, "
                            f"{queue_delay_us}")  # fmt: skip
    if storage_uri is not None and not _STORAGE_URI.fullmatch(storage_uri):
        raise PipelineError(
            f"Expected a storage URI with a scheme (pvc://, s3://, gs://, https://, ...). Received: {storage_uri!r}"
        )
    if not _IMAGE.fullmatch(consumer_image):
        raise PipelineError(
            f"Expected a container image reference ([registry/]name[:tag][@sha256:digest], lowercase name). "
            f"Received: {consumer_image!r}"
        )


@contextlib.contextmanager
def _one_writer(out: Path) -> Iterator[None]:
    """Writers into one folder (the CLI, scheduled publishes, on any host sharing it) take turns."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".write.lock")
    try:
        lock.acquire(timeout=LOCK_SECONDS)
    except Timeout:
        raise PipelineError(f"Another export held {lock.lock_file} for {LOCK_SECONDS} s") from None
    try:
        yield
    finally:
        lock.release()


def _write_all(model: ServedModel, out: Path, tracking_uri: str | None, storage_uri: str | None,
               consumer_image: str, max_batch_size: int, queue_delay_us: int,
               consumer_tracking_uri: str | None = None) -> dict[str, str]:  # fmt: skip
    storage = storage_uri or DEFAULT_STORAGE_URI
    isvc_path, consumer_path = manifest_paths(out, model)
    for path in (isvc_path, consumer_path):  # one file per model: other models' manifests stay
        _check_manifest_owner(path, model)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # a new model's folder a crash left before its rename
    uri, note = _consumer_tracking_uri(consumer_tracking_uri, tracking_uri)
    if not model.source.startswith("models:/") and not storage.startswith("pvc://"):
        # The consumer reads a file from a mounted claim, not from object storage: its pods would stay Pending.
        note = "; ".join(filter(None, [note, (
            f"the consumer's pods read the published file from the volume claim {PVC!r} (at /models/triton), "
            f"not from {storage}: publish the repository there too, or export a models:/ source")]))  # fmt: skip

    def manifests() -> None:  # before config.pbtxt says the version is served: a crash leaves it to be redone
        write_text(isvc_path, _yaml([inference_service(model, storage)]))
        write_text(consumer_path, _yaml(consumer_manifests(model, consumer_image, uri, storage)))

    folder = write_triton(model, out / "triton", max_batch_size, queue_delay_us, manifests)
    return {"triton": str(folder), "kserve": str(isvc_path), "kubernetes": str(consumer_path), "name": model.name,
            "version": model.version, "note": note}  # fmt: skip


def manifest_paths(out: Path, model: ServedModel) -> tuple[Path, Path]:
    """The KServe and the consumer's Kubernetes manifest of ``model`` under ``out``."""
    return out / "kserve" / f"{model.k8s_name}.yaml", out / "kubernetes" / f"{model.k8s_name}-consumer.yaml"


def _check_manifest_owner(path: Path, model: ServedModel) -> None:
    """Another model whose name makes the same Kubernetes name (``Vit_Pets``, ``vit.pets``) is not overwritten."""
    import yaml

    if not path.is_file():
        return
    try:
        first = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        owner = first["metadata"]["annotations"]["vit-pipeline/source"]
    except Exception:  # not one of ours, or edited by hand: leave it alone
        raise PipelineError(
            f"{path} exists and was not written by export-serving: export into another folder"
        ) from None
    if _identity(owner) != _identity(model.source):
        raise PipelineError(f"{path} is {owner!r}'s ({model.source!r} has the same Kubernetes name "
                            f"{model.k8s_name!r}): export into another folder")  # fmt: skip


LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def _consumer_tracking_uri(given: str | None, export_uri: str | None) -> tuple[str, str]:
    """The MLflow server the consumer's pods read the registry from, and a note when it is not the export's."""
    from urllib.parse import urlparse

    from vit_pipeline import tracking

    if given:
        return given, ""
    uri = export_uri or tracking.tracking_uri()
    host = urlparse(uri).hostname or ""
    if uri.startswith(("http://", "https://")) and host not in LOOPBACK and not host.startswith("127."):
        return uri, ""
    default = "http://mlflow:5000"
    return default, (f"the consumer's pods read the registry from {default} ({uri} is this machine's); "
                     "--consumer-tracking-uri sets it")  # fmt: skip


def _no_champion_yet(source: str, tracking_uri: str | None) -> str | None:
    """Why ``models:/<name>@<alias>`` names no version now (the model or the alias does not exist), else None."""
    from vit_pipeline import registry, tracking
    from vit_pipeline.config import make_config

    target = re.match(r"^models:/([^/@]+)@([^/]+)$", source)
    if target is None:
        return None
    client = tracking.client(make_config("quickstart", {"tracking_uri": tracking_uri}))
    if registry.current_champion(client, target[1], target[2]) is None:  # RegistryError on an outage
        return str(registry.NoChampion(target[1], target[2]))
    return None


def publish(source: str, out_dir: str | Path, tracking_uri: str | None = None, *, storage_uri: str | None = None,
            consumer_image: str = "vit-consumer:latest", max_batch_size: int = 64,
            queue_delay_us: int = 2000, consumer_tracking_uri: str | None = None) -> dict[str, Any]:  # fmt: skip
    """``export_serving`` when ``out_dir`` does not serve ``source``'s version (the champion moved), else nothing.

    For a schedule (the ``publish-serving`` deployment): an alias is pinned to its version once, and a
    repository whose ``config.pbtxt`` already serves that version is left as it is, so Triton's model
    control sees a change only when there is one: a new champion, or a rollback to an earlier version
    (its folder is written again and the config names it). Publishes into one folder take turns (a file
    lock in it), and a publish that crashed part-way is redone. A folder of another model of the same
    name is an error, not "already served".

    Returns:
        ``published`` (True/False), ``name``, ``version`` and, when published, the written paths.

    Raises:
        PipelineError: the source cannot be read, or another writer held the folder for ``LOCK_SECONDS``.
    """
    _check_options(max_batch_size, queue_delay_us, storage_uri, consumer_image, consumer_tracking_uri)
    if (missing := _no_champion_yet(source, tracking_uri)) is not None:  # a fresh install: nothing to publish
        return {"published": False, "name": None, "version": None, "reason": missing}
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="vit-export-", dir=scratch_root()) as download, _one_writer(out):
        model = read_model(source, tracking_uri, download)
        folder = out / "triton" / model.name
        if folder.is_dir():  # another model's folder is an error, not "already served"
            _check_same_model(folder, model)
        if served_version(folder) == model.version and all(p.is_file() for p in manifest_paths(out, model)):
            return {"published": False, "name": model.name, "version": model.version,
                    "reason": f"version {model.version} is already served from {folder}"}  # fmt: skip
        # The files are the version read once; the consumer's manifest keeps the alias (it follows it).
        written = _write_all(model, out, tracking_uri, storage_uri, consumer_image, max_batch_size,
                             queue_delay_us, consumer_tracking_uri)  # fmt: skip
    return {"published": True, **written}
