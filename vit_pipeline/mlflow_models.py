"""The Keras model in MLflow: logged so that it loads the MLflow way, anywhere.

A logged ``.keras`` file names the pipeline's custom layers
(``vit_pipeline>Patches``, ``vit_pipeline>Normalization``, ...). Keras finds them
only after ``vit_pipeline.layers`` has run its ``register_keras_serializable``
decorators, so ``mlflow.pyfunc.load_model(uri)`` or ``mlflow.keras.load_model(uri)``
in a fresh Python failed with "Could not locate class 'Normalization'".

The fix needs nothing from the user but an installed vit-pipeline: the package
declares an MLflow plugin (entry point ``mlflow.run_context_provider``, which
MLflow loads at ``import mlflow``). The plugin adds no tags to any run; creating
it registers a post-import hook (``wrapt``) that imports ``vit_pipeline.layers``
as soon as Keras itself is imported, whoever imports it. MLflow's Keras loader
imports Keras before it reads the file, so the layers are known in time. Nothing
heavy is imported at ``import mlflow``: the hook fires only with Keras.
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
    """
    from mlflow.models import Model

    from vit_pipeline import tracking

    client = tracking.client(cfg)  # also the global tracking URI Model.log uploads to
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, params=dict(run.data.params)
    )
    return Model.log(
        artifact_path=None, name=name, flavor=flavor, run_id=run_id, model_id=logged.model_id, **kwargs
    )


def log_keras_model(cfg: PipelineConfig, run_id: str, model, signature):
    """Logs ``model`` to ``run_id`` with MLflow's Keras flavour (also a pyfunc); returns the ModelInfo."""
    import keras
    import mlflow.keras
    import tensorflow as tf

    from vit_pipeline import __version__

    return log_model(
        cfg,
        run_id,
        mlflow.keras,
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
            "custom_layers": "vit_pipeline.layers (registered on import of keras by the vit-pipeline plugin)"
        },
    )


def _register_layers(_keras_module) -> None:
    try:
        import vit_pipeline.layers  # noqa: F401  (its decorators register the custom layers)
    except Exception as exc:  # never break the user's `import keras`
        log.warning("vit-pipeline could not register its Keras layers: %s", exc)


def install_keras_hook() -> None:
    """Imports ``vit_pipeline.layers`` right after Keras is imported (at once if it already is)."""
    import wrapt

    wrapt.register_post_import_hook(_register_layers, "keras")


try:
    from mlflow.tracking.context.abstract_context import RunContextProvider
except ImportError:  # mlflow-skinny-free installs (the consumer app) never load the plugin
    RunContextProvider = object  # type: ignore[assignment,misc]


class KerasLayersPlugin(RunContextProvider):
    """The MLflow plugin object: MLflow creates one at ``import mlflow``; it adds no run tags."""

    def __init__(self):
        install_keras_hook()

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict[str, str]:
        return {}
