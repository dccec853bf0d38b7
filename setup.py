"""vit-pipeline's dependencies (the rest of the metadata is in pyproject.toml).

vit-pipeline depends on the vit-consumer distribution (the TensorFlow-free serving
app and the serving contract, deploy/consumer) instead of shipping its files. Built
from this repository, that dependency is the folder beside this file (an absolute
``file:`` URL, which pyproject.toml cannot state); built from a source archive that
lacks the folder, it is the published distribution of the same version range.
"""

from pathlib import Path

from setuptools import setup

CONSUMER = Path(__file__).resolve().parent / "deploy" / "consumer"
CONSUMER_REQUIREMENT = (
    f"vit-consumer[serve,registry] @ {CONSUMER.as_uri()}"
    if (CONSUMER / "pyproject.toml").is_file()
    else "vit-consumer[serve,registry]>=0.3,<0.4"
)

setup(
    install_requires=[
        CONSUMER_REQUIREMENT,
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        # Fine-tuning (vit_pipeline.finetune): Keras-Hub's ViTBackbone, its presets and its converter for
        # Hugging Face ViT checkpoints (safetensors).
        "keras-hub>=0.32,<0.33",
        "safetensors>=0.4",
        "tf2onnx>=1.17,<1.18",
        "onnx>=1.17,<2",
        # The GPU build carries the CPU provider too; never install plain onnxruntime beside it.
        "onnxruntime-gpu>=1.22,<2",
        "sympy>=1.12",  # ONNX Runtime's symbolic shape inference (int8 calibration)
        "mlflow>=3.5,<4",
        "prefect>=3.4,<4",
        # Sweeps: trials as Prefect tasks on a Dask cluster (see vit_pipeline/flows/sweep.py for why Dask).
        "prefect-dask>=0.3.7,<0.4",
        "pyyaml>=6,<7",
        "scikit-learn>=1.5,<2",
        "matplotlib>=3.8,<4",
        "numpy>=2,<3",  # np.bitwise_count (leakage: Hamming distances of perceptual hashes)
        # The gates (vit_pipeline.data_validation, .robustness): perceptual hashes for near-duplicate test
        # images; the CIFAR-100-C corruptions from the maintained fork of Hendrycks' imagecorruptions.
        "ImageHash>=4.3,<5",
        "imagecorruptions-imaug>=1.1.5,<2",
        "markdown>=3.4,<4",  # the model card's HTML (vit_pipeline.model_card)
        "pillow>=10,<14",
        "click>=8.1,<9",
        "pydantic>=2.7,<3",  # the typed config (field docstrings as descriptions: 2.7)
        # Run ownership (process start times) for the run lifecycle.
        "psutil>=5.9,<8",
        "filelock>=3.12,<5",  # publish-serving: one publish into a folder at a time
        # GPU figures in MLflow's system metrics (NVML; harmless without a GPU).
        "nvidia-ml-py>=12",
    ],
)
