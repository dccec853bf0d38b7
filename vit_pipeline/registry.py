"""MLflow model registry: log the ONNX model, register it, champion/challenger.

Each registered version carries tags ``test_accuracy``, ``dataset`` and
``data_digest``. The alias ``champion`` says which version is live; it moves to a
new version according to ``promotion_policy``:

* ``better_or_equal`` (default): the new version's test accuracy is at least the
  champion's, and both were trained on the same dataset (``dataset`` tag);
* ``always`` / ``never``.

The decision is written as run tags (``registry.decision``, ``registry.reason``)
and returned for the Prefect summary.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vit_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass
class Registration:
    """The outcome of registering one model version."""

    name: str
    version: str
    model_uri: str
    promoted: bool
    reason: str
    champion_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_champion(client, name: str, alias: str = CHAMPION):
    """The version holding ``alias`` (default ``champion``), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(policy: str, new_accuracy: float, dataset: str, champion) -> tuple[bool, str]:
    """Whether the new version becomes champion, and why (a sentence for people)."""
    if policy == "always":
        return True, "policy 'always'"
    if policy == "never":
        return False, "policy 'never'"
    if champion is None:
        return True, "no champion yet"
    champ_dataset = champion.tags.get("dataset")
    champ_acc = float(champion.tags.get("test_accuracy", "nan"))
    if champ_dataset != dataset:
        return False, f"champion v{champion.version} was trained on {champ_dataset!r}, not {dataset!r}"
    if new_accuracy >= champ_acc:
        return True, f"test accuracy {new_accuracy:.4f} >= champion v{champion.version}'s {champ_acc:.4f}"
    return False, f"test accuracy {new_accuracy:.4f} < champion v{champion.version}'s {champ_acc:.4f}"


def register_onnx(
    cfg: PipelineConfig,
    run_id: str,
    onnx_path: str,
    example: np.ndarray,
    test_accuracy: float,
    data_digest: str,
) -> Registration:
    """Logs the ONNX file with ``mlflow.onnx.log_model``, registers it, applies the policy."""
    import mlflow
    import onnx
    import onnxruntime as ort

    from vit_pipeline import tracking
    from vit_pipeline.export import INPUT_NAME, OUTPUT_NAME, ort_session, run_onnx

    client = tracking.client(cfg)
    name = cfg.resolved_model_name
    example = example.astype(np.float32)
    outputs = run_onnx(ort_session(onnx_path), example, len(example))
    signature = mlflow.models.infer_signature({INPUT_NAME: example}, {OUTPUT_NAME: outputs})
    with tracking.open_run(cfg, run_id):
        info = mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="onnx-model",
            signature=signature,
            input_example={INPUT_NAME: example},
            registered_model_name=name,
            # Weights inside the one file: consumers download just model.onnx.
            save_as_external_data=False,
            # The GPU build carries the CPU provider; never pull plain onnxruntime beside it.
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime-gpu=={ort.__version__}"],
        )
    version = str(info.registered_model_version)
    tags = {"test_accuracy": f"{test_accuracy:.6f}", "dataset": cfg.dataset_tag,
            "data_digest": data_digest, "mlflow_run_id": run_id}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    champion = current_champion(client, name)
    promoted, reason = decide(cfg.promotion_policy, test_accuracy, cfg.dataset_tag, champion)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    champion_version = version if promoted else (str(champion.version) if champion else None)
    decision = "promoted" if promoted else "not promoted"
    client.set_model_version_tag(name, version, "promotion", f"{decision}: {reason}")
    client.set_tag(run_id, "registry.model", f"{name}/{version}")
    client.set_tag(run_id, "registry.decision", decision)
    client.set_tag(run_id, "registry.reason", reason)
    log.info("Registered %s v%s: %s (%s)", name, version, decision, reason)
    return Registration(name, version, f"models:/{name}/{version}", promoted, reason, champion_version)
