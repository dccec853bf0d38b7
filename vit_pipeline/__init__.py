"""vit-pipeline: train, evaluate, export and serve a Vision Transformer.

Importing the package is cheap and has no side effects: TensorFlow, MLflow and
Prefect are imported by the stage modules that need them.
"""

__version__ = "0.1.0"
