"""vit-consumer: serve the exported ViT with ONNX Runtime only (no TensorFlow).

Depends on onnxruntime(-gpu), numpy and Pillow; the HTTP service adds FastAPI and
uvicorn, loading from the MLflow registry adds mlflow-skinny.
"""

from vit_consumer.classifier import InputError, OnnxClassifier

__all__ = ["InputError", "OnnxClassifier"]
__version__ = "0.3.0"
