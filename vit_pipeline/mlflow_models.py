"""The models in MLflow: logged so that they load the MLflow way, with no global hook.

A logged ``.keras`` file names the pipeline's custom layers (``vit_pipeline>Patches``,
``vit_pipeline>Normalization``, ...); Keras finds them only once
``vit_pipeline.layers`` has run its ``register_keras_serializable`` decorators.

* ``mlflow.pyfunc.load_model(uri)``, in a Python that imports nothing but ``mlflow``:
  the Keras model is logged with MLflow's Keras flavour, and its ``python_function``
  flavour names this module as its loader (``mlflow.pyfunc.add_to_model``, MLflow's
  documented mechanism for custom flavours). MLflow imports the loader, which
  imports the layers and then hands over to MLflow's own Keras loader.
* ``mlflow.keras.load_model(uri, custom_objects=vit_pipeline.layers.custom_objects())``:
  the Keras flavour itself, with the layers given explicitly.

vit-pipeline must be installed where a model is loaded (the logged requirements
say so). Nothing runs at ``import mlflow``.
"""

from __future__ import annotations

import logging

from vit_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

KERAS_ARTIFACT = "keras-model"


def log_model(cfg: PipelineConfig, run_id: str, flavor, name: str, **kwargs):
    """``Model.log`` for an explicit run: the logged model lands in the run's own experiment.

    Without an active fluent run, ``Model.log`` would create the LoggedModel in
    the fluent default experiment; creating it first with the client keeps it
    beside its run (and its artifacts under that experiment's location).
    ``Model.log`` uploads through MLflow's process-wide store, set for this call only.
    """
    from mlflow.models import Model

    from vit_pipeline import tracking

    client = tracking.client(cfg)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, params=dict(run.data.params)
    )
    with tracking.fluent_store(cfg):
        return Model.log(
            artifact_path=None, name=name, flavor=flavor, run_id=run_id, model_id=logged.model_id, **kwargs
        )


def log_keras_model(cfg: PipelineConfig, run_id: str, model, signature):
    """Logs ``model`` to ``run_id`` (Keras flavour; its pyfunc loads through this module)."""
    import sys

    import keras
    import tensorflow as tf

    from vit_pipeline import __version__

    return log_model(
        cfg,
        run_id,
        sys.modules[__name__],  # this module is the flavour: save_model below
        KERAS_ARTIFACT,
        model=model,
        signature=signature,
        # Listing requirements skips MLflow's slow inference (it reloads the model).
        pip_requirements=[
            f"tensorflow=={tf.__version__}",
            f"keras=={keras.__version__}",
            f"vit-pipeline=={__version__}",
        ],  # fmt: skip
        metadata={
            "custom_layers": "vit_pipeline.layers (imported by the pyfunc loader vit_pipeline.mlflow_models)"
        },
    )


def save_model(path, mlflow_model, **kwargs) -> None:
    """MLflow's Keras ``save_model``, with this module as the ``python_function`` loader.

    ``Model.log`` calls it (this module is the flavour it is given). The Keras
    flavour is untouched, so ``mlflow.keras.load_model`` reads the same files.
    """
    import os

    import mlflow.keras
    from mlflow import pyfunc
    from mlflow.models.model import MLMODEL_FILE_NAME

    mlflow.keras.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    # The same python_function flavour MLflow's Keras save_model writes, with this module as its loader.
    env = mlflow_model.flavors[pyfunc.FLAVOR_NAME][pyfunc.ENV]
    pyfunc.add_to_model(
        mlflow_model, loader_module=__name__, conda_env=env["conda"], python_env=env["virtualenv"]
    )
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def _load_pyfunc(path):
    """MLflow's pyfunc entry (the ``loader_module`` of a logged Keras model): the layers, then Keras' loader."""
    import mlflow.keras

    import vit_pipeline.layers  # noqa: F401  (its decorators register the custom layers)
    import vit_pipeline.optimizer  # noqa: F401  (and the fine-tuning optimizer a model may be compiled with)

    return mlflow.keras._load_pyfunc(path)  # the Keras flavour's own pyfunc entry


def load_keras(model_uri: str):
    """A logged Keras model, loaded by ``vit_pipeline.model.load_model`` (Keras-Hub layers, exportable GELU).

    Call inside ``tracking.fluent_store(cfg)`` (``models:/`` and ``runs:/`` resolve against it).
    """
    import tempfile
    from pathlib import Path

    import mlflow

    from vit_pipeline.fsutil import scratch_root
    from vit_pipeline.model import load_model

    # Read into memory, then removed (each weekly benchmark left the champion's copy in the temporary folder).
    with tempfile.TemporaryDirectory(prefix="vit-keras-", dir=scratch_root()) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        file = keras_file(local)
        if file is None:
            raise FileNotFoundError(f"No .keras file in {model_uri}")
        return load_model(str(file))


def keras_file(path):
    """The ``.keras`` file a downloaded Keras model (an MLflow model folder) holds, or ``path`` itself."""
    from pathlib import Path

    path = Path(path)
    files = [path] if path.suffix == ".keras" else sorted(path.rglob("*.keras"))
    return files[0] if files else None
