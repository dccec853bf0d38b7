"""One typed configuration for the whole pipeline, with named presets.

``PipelineConfig`` is a pydantic model and the one definition of every setting: its
types and constraints validate values, its field docstrings are the descriptions, and
from it come the CLI options (``--field-name value``), the typed ``ConfigOverrides``
that the Prefect flows take as a parameter (so the Prefect UI's custom-run form shows
every field with its type, default and description, and the Prefect server refuses an
invalid value when a run is created) and the JSON schema. Errors name the field and
the value, in one line.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from vit_consumer.contract import MAX_BATCH_SIZE

from vit_pipeline.errors import ConfigError

SERVE_CANDIDATES = ("optimized", "int8", "int8-static")
BENCHMARK_VARIANTS = ("fp32", "optimized", "int8", "int8-static", "fp16")  # vit_pipeline.variants.VARIANTS
# imagecorruptions.get_corruption_names("all"): Hendrycks and Dietterich's 15 and their 4 extra.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip


def _names_pattern(names: tuple[str, ...], allow_empty: bool) -> str:
    """A regular expression for a comma-separated list of ``names`` (JSON-schema checkable)."""
    one = "(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")"
    items = rf"\s*{one}\s*(,\s*{one}\s*)*"
    return f"^({items})?$" if allow_empty else f"^{items}$"


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Rate = Annotated[float, Field(ge=0, lt=1)]  # a probability or fraction that must leave something
OpenFraction = Annotated[float, Field(gt=0, lt=1)]
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
ServeCandidates = Annotated[str, Field(pattern=_names_pattern(SERVE_CANDIDATES, allow_empty=True))]
BenchmarkVariants = Annotated[str, Field(pattern=_names_pattern(BENCHMARK_VARIANTS, allow_empty=False))]
Corruptions = Annotated[str, Field(pattern=_names_pattern(CORRUPTIONS, allow_empty=False))]

# What a value must look like, for the fields whose constraint is a pattern (for the error message).
_EXPECTED = {
    "dataset_name": "letters, digits, '.', '_' or '-' (at most 64)",
    "serve_candidates": f"a comma-separated list from {SERVE_CANDIDATES}",
    "benchmark_variants": f"a non-empty comma-separated list from {BENCHMARK_VARIANTS}",
    "corruptions": f"a non-empty comma-separated list from {CORRUPTIONS}",
    "registered_model_name": "1 to 256 characters without '/', ':', '%' (MLflow refuses them in names) or '@' "
    "(models:/<name>@<alias> could not name it)",
}


def split_names(value: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (the comma-separated variant lists)."""
    return [v.strip() for v in value.split(",") if v.strip()]


class _Fields(BaseModel):
    """Parses text (CLI options, YAML) into the declared types before pydantic checks them."""

    # No infinities or NaN for any float (an infinite parity tolerance switched the gate off, an infinite
    # tracking wait never returned).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _from_text(cls, value: Any, info: Any) -> Any:
        return _parse(info.field_name, cls.model_fields[info.field_name].annotation, value)


class DataConfig(_Fields):
    """Where the images come from and how they are split."""

    dataset: Literal["digits", "cifar100", "image_folder"] = "cifar100"
    """Data source: "digits" (scikit-learn's 8x8 digits, upscaled, ships with a dependency), "cifar100"
    (downloaded once through Keras' cache, or read from ``data_path``), "image_folder" (one sub-folder
    per class)."""
    data_path: str | None = None
    """Local CIFAR-100 copy (a ``cifar-100-python`` directory or its ``.tar.gz``) or the image folder
    root (``ROOT/<class>/...`` or ``ROOT/{train,val|validation,test}/<class>/...``)."""
    dataset_name: DatasetName | None = None
    """Name of the data in the experiment, the registered model and the version tags (``vit-<name>``);
    None: the dataset (or, for an image folder, the folder's name)."""
    label_mode: Literal["fine", "coarse"] = "fine"
    """CIFAR-100 labels: "fine" (100 classes) or "coarse" (20)."""
    input_size: PositiveInt = 32
    """Side of the square images the model takes (raw pixels)."""
    validation_split: OpenFraction = 0.1
    """Fraction of the training images held out for validation."""
    test_split: OpenFraction = 0.2
    """Fraction held out for test, for sources without a test split."""
    max_train_images: PositiveInt | None = None
    """Stratified cap on training images (None: all)."""
    max_test_images: PositiveInt | None = None
    """Stratified cap on test images (None: all)."""


class ModelConfig(_Fields):
    """The ViT's architecture, where its first weights come from, and the training-only augmentation layers it
    carries."""

    init_from: str | None = None
    """Start from pre-trained weights instead of random ones (``vit_pipeline.finetune``): a model of this
    project (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>/keras-model`` or a
    ``.keras`` file), a Keras-Hub ViT preset (a name, downloaded when online, or a local preset folder) or
    a Hugging Face ViT checkpoint folder (``config.json`` + ``model.safetensors``). The architecture fields
    not set explicitly are taken from the checkpoint; the head is new unless it is this project's model with
    the same class names and a head that fits (a Keras-Hub or Hugging Face classifier's head is always new);
    the position embeddings are interpolated when ``image_size`` gives another patch grid."""
    backbone: Literal["vit_pipeline", "keras_hub"] = "vit_pipeline"
    """Which ViT implementation: "vit_pipeline" (this project's layers, ``vit_pipeline.layers``) or
    "keras_hub" (``keras_hub.models.ViTBackbone``: class token, standard attention; set by ``init_from``
    for a Keras-Hub or Hugging Face checkpoint)."""

    image_size: PositiveInt = 72
    """Side the model resizes images to before cutting patches."""
    patch_size: PositiveInt = 6
    """Side of each square patch; must divide ``image_size``."""
    projection_dim: PositiveInt = 64
    """Width of the patch embeddings."""
    num_heads: PositiveInt = 4
    """Attention heads per transformer block."""
    transformer_layers: PositiveInt = 8
    """Number of transformer blocks."""
    transformer_units: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (128, 64)
    """Hidden sizes of each block's MLP; the last must equal ``projection_dim`` (residual connection)."""
    mlp_head_units: tuple[PositiveInt, ...] = (2048, 1024)
    """Hidden sizes of the classification head's MLP (may be empty: a single Dense to the logits)."""
    pooling: Literal["flatten", "gap", "class_token"] = "flatten"
    """How the head reads the tokens: "flatten" (the seed: all tokens concatenated, 18.9 M of the seed's
    21.8 M parameters), "gap" (global average pooling) or "class_token" (a learned token prepended,
    ViT/DeiT)."""
    head_dim: PositiveInt | None = None
    """Width of each attention head; None means ``projection_dim`` (the seed's choice: 4 heads of 64 on
    a 64-wide embedding)."""
    patch_tokenization: Literal["standard", "shifted"] = "standard"
    """"standard" or "shifted" (Shifted Patch Tokenization: each patch also sees its diagonal
    neighbours, Lee et al. 2021)."""
    attention_type: Literal["standard", "lsa"] = "standard"
    """"standard" (Keras MultiHeadAttention) or "lsa" (Locality Self-Attention: learned temperature, no
    attention to oneself)."""
    stochastic_depth_rate: Rate = 0.0
    """Drop-path rate of the last block; rates rise linearly from 0 in the first block (training only)."""
    attention_dropout: Rate = 0.1
    """Dropout inside multi-head attention."""
    mlp_dropout: Rate = 0.1
    """Dropout after each block-MLP layer."""
    head_dropout: Rate = 0.5
    """Dropout before and inside the head MLP."""
    random_flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    """Training-only flip augmentation mode."""
    random_rotation: Rate = 0.02
    """Training-only rotation factor (fraction of 2*pi)."""
    random_zoom: Rate = 0.2
    """Training-only zoom factor."""


class OptimizerConfig(_Fields):
    """How the model is trained: epochs, batches, AdamW and its schedule, the loss and the input pipeline's
    augmentation, the seed."""

    epochs: PositiveInt = 100
    """Training epochs."""
    batch_size: PositiveInt = 256
    """Training batch size per replica (the global batch is ``batch_size * num_replicas``; one replica
    unless mirrored)."""
    distribution_strategy: Literal["default", "mirrored"] = "default"
    """"default" (one device) or "mirrored" (``tf.distribute.MirroredStrategy`` over every local GPU, or
    every logical CPU device without GPUs); see ``vit_pipeline.distribute``."""
    learning_rate: PositiveFloat = 1e-3
    """AdamW (peak) learning rate."""
    lr_schedule: Literal["constant", "warmup_cosine"] = "constant"
    """"constant" (the seed) or "warmup_cosine" (linear warm-up from 0 to ``learning_rate``, then cosine
    decay to 0 at the last step)."""
    warmup_fraction: Rate = 0.0
    """Share of all training steps spent warming up (0.1 = 10 of 100 epochs); scales with ``epochs`` so
    short runs keep the shape."""
    weight_decay: NonNegativeFloat = 0.1
    """AdamW weight decay, Keras semantics: decays lr x weight_decay x w per step (tfa: weight_decay x w)."""
    weight_decay_scope: Literal["all", "kernels"] = "all"
    """Which weights decay: "all" (the seed: tensorflow-addons decayed every variable) or "kernels"
    (DeiT/timm practice: biases, norm scales and offsets, position embeddings, the class token and LSA's
    temperature are excluded; see ``train.no_decay_variables``)."""
    label_smoothing: Rate = 0.0
    """Label smoothing of the cross-entropy (0: none)."""
    rand_augment_ops: NonNegativeInt = 0
    """RandAugment operations per image (0: off). Training only, applied in the input pipeline, never
    part of the model."""
    rand_augment_factor: Annotated[float, Field(ge=0, le=1)] = 0.5
    """RandAugment strength in [0, 1]."""
    random_erasing: Rate = 0.0
    """Probability of erasing a random rectangle of an image (training only, input pipeline)."""
    mixup_alpha: NonNegativeFloat = 0.0
    """MixUp Beta(alpha, alpha) parameter (0: off)."""
    cutmix_alpha: NonNegativeFloat = 0.0
    """CutMix Beta(alpha, alpha) parameter (0: off). With MixUp also on, each batch gets one of the two,
    with equal odds (DeiT)."""
    max_train_minutes: PositiveFloat | None = None
    """Stop after the first epoch that ends past this many minutes of training (epoch wall time,
    validation included; the best checkpoint is kept); None: run every epoch. For time-to-accuracy
    budgets; the schedule still spans ``epochs``."""
    linear_probe_epochs: NonNegativeInt = 0
    """Head-only epochs first (a linear probe: the backbone's learning rate is 0), then the whole network
    (LP-FT, Kumar et al. 2022). Counted within ``epochs``."""
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Layer-wise learning-rate decay: block ``b`` of ``L`` learns at ``layer_decay ** (L + 1 - b)`` times the
    rate, the embeddings at ``layer_decay ** (L + 1)``, the head at the full rate (BEiT, MAE); 1: off."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 42
    """Seed for the split, weight initialisation and augmentation (numpy and scikit-learn take 0 to 2**32 - 1)."""


class TrackingConfig(_Fields):
    """Where a run is recorded (MLflow); nothing here changes what is trained."""

    experiment_name: str | None = None
    """MLflow experiment; None means ``vit-<dataset>``."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None means ``$MLFLOW_TRACKING_URI`` or the local SQLite store under
    ``$VIT_PIPELINE_HOME``."""
    run_name: str | None = None
    """MLflow run name; None lets MLflow pick one."""
    tracking_wait_seconds: NonNegativeFloat = 10.0
    """How long to wait for an HTTP tracking server to answer before failing (before any training
    starts)."""
    system_metrics_seconds: NonNegativeFloat = 10.0
    """Sampling interval of MLflow's system metrics (CPU, memory, disk, network, NVIDIA GPU) for every
    run; 0: off."""


class ExportConfig(_Fields):
    """The ONNX export, its gates, the serving candidates and the registry's champion rule."""

    onnx_opset: Annotated[int, Field(ge=13, le=18)] = 17
    """ONNX opset of the export."""
    parity_tolerance: PositiveFloat = 1e-3
    """Largest allowed |Keras - ONNX Runtime| logit difference."""
    parity_images: PositiveInt = 256
    """How many test images the parity gate compares (at most)."""
    registered_model_name: Annotated[str, Field(pattern=r"^[^/:%@]{1,256}$")] | None = None
    """MLflow registry name; None means ``vit-<dataset>``."""
    promotion_policy: Literal["better_or_equal", "always", "never"] = "better_or_equal"
    """When the ``champion`` alias moves to a new version: "better_or_equal" (test accuracy at least the
    champion's, same dataset), "always" or "never"."""
    serve_variant: Literal["optimized", "fp32"] = "optimized"
    """Which ONNX graph is registered and served: "optimized" (fused LayerNorm/GELU/attention for ONNX
    Runtime; parity-gated like the plain export) or "fp32" (the plain, portable tf2onnx export)."""
    serve_candidates: ServeCandidates = "optimized,int8-static"
    """Comma-separated variants built at export, gated and registered beside the served file for the
    consumer to choose from on its own CPU (``vit_pipeline.variants``): optimized, int8, int8-static
    (calibrated on real training images)."""
    candidate_min_agreement: Annotated[float, Field(gt=0, le=1)] = 0.995
    """Top-1 agreement with the fp32 Keras model, on real test images, a candidate needs to be
    registered."""
    candidate_images: PositiveInt = 2000
    """Test images the candidate gate uses (up to all)."""
    serve_gate_images: PositiveInt = 512
    """Test images registered with the model (with the Keras logits on them, at most 8 MiB of pixels), so
    the consumer runs the agreement gate again on the CPU that serves: another engine (OpenVINO, bf16 on
    AMX) or that CPU's int8 kernels serve only if they keep ``candidate_min_agreement``."""
    int8_calibration_images: PositiveInt = 256
    """Training images int8-static is calibrated on."""


class BenchmarkConfig(_Fields):
    """The inference benchmark stage."""

    benchmark_batch_sizes: Annotated[tuple[Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)], ...], Field(min_length=1)] = (
        1, 8, 64, 256,
    )  # fmt: skip
    """Batch sizes of the benchmark stage."""
    benchmark_variants: BenchmarkVariants = "fp32,optimized,int8,int8-static,fp16"
    """Comma-separated ONNX variants to time: fp32, optimized, int8, int8-static (CPU), fp16 (GPU only)."""
    benchmark_providers: str | None = None
    """Comma-separated providers (cpu, cuda, tensorrt); None: every provider this onnxruntime build has."""
    benchmark_seconds: PositiveFloat = 1.0
    """Timing budget per cell and round."""
    benchmark_rounds: PositiveInt = 3
    """Alternating rounds over all cells."""


class GatesConfig(_Fields):
    """The gates a model passes before it ships (data validation, drift, leakage, ...)."""

    schema_path: str | None = None
    """The dataset's schema (JSON, editable); None: $VIT_PIPELINE_HOME/schemas/<dataset>.json. Inferred on
    the dataset's first run."""
    min_class_fraction: OpenFraction = 0.5
    """When a schema is inferred: each class's minimum image count per split, as a share of its count then."""
    drift_channel_threshold: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Largest Jensen-Shannon distance (base 2) of a channel histogram from the champion's training data."""
    drift_class_threshold: Annotated[float, Field(gt=0, le=1)] = 0.05
    """Largest L-infinity distance of the class distribution from the champion's training data."""
    drift_blocks_promotion: bool = True
    """Whether drift above a threshold keeps the new version from becoming champion."""
    max_conflicting_images: NonNegativeInt = 0
    """Images (identical pixels) that appear under two or more classes, anywhere in the data, above which data
    validation fails: the same folder copied under two names, or re-sorted by hand, teaches and scores the model
    on contradictions."""
    leakage_max_distance: Annotated[int, Field(ge=0, le=32)] = 4
    """A test image within this many bits (of 64) of a training image's perceptual hash is a near duplicate."""
    drop_leaked_test: bool = False
    """Remove exact and near duplicates of training images from the test split before evaluation (also
    of the images the ``init_from`` checkpoint was trained on)."""
    init_leakage_blocks_promotion: bool = True
    """Whether test images that the ``init_from`` checkpoint (or its ancestors) trained on, kept in the test
    split, keep the version from becoming champion: its test figures would flatter it."""
    min_test_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """Value threshold: the served file's top-1 on the test split must reach this to become champion."""
    min_class_recall: Annotated[float, Field(ge=0, le=1)] | None = None
    """Value threshold: every class with at least class_min_support test images must reach this recall."""
    max_test_ece: Annotated[float, Field(gt=0, le=1)] | None = None
    """Value threshold: the served file's expected calibration error on the test split, at the temperature it
    serves with (ece_bins bins), must not exceed this: apps act on its probabilities."""
    min_relative_robustness: Annotated[float, Field(gt=0, le=1)] | None = None
    """Value threshold: the robustness stage's mean top-1 under corruption, as a share of its clean top-1 on the
    same images (robustness_relative_accuracy), must reach this."""
    max_accuracy_drop: NonNegativeFloat = 0.0
    """Change threshold: points of top-1 the new version may lose against the champion on the same test images
    (0: at least the champion's)."""
    max_class_recall_drop: NonNegativeFloat | None = 30.0
    """Change threshold: points of recall a class with at least class_min_support test images may lose against
    the champion (None: no per-class check)."""
    max_label_shift: Annotated[float, Field(gt=0, le=100)] | None = 50.0
    """Change threshold: points of recall the champion may lose on a class between its own test split and this
    run's (95% intervals apart too) before the class's labels count as changed: the same name, other images
    (relabelled or re-sorted data), which a model trained on them always wins (None: not checked)."""
    max_robustness_drop: NonNegativeFloat | None = None
    """Change threshold: points of mean top-1 under corruption (the robustness stage's corruptions and severities,
    on up to robustness_images test images the champion did not train on) the served file may lose against the
    champion's file on the same corrupted images (None: not compared; set, the register stage corrupts the
    images once and runs both files on them, before the registry lock, and again under it only if the champion
    moved meanwhile)."""
    class_min_support: PositiveInt = 50
    """Test images a class needs for its per-class thresholds (fewer: too noisy to judge)."""
    ece_bins: Annotated[int, Field(ge=2, le=100)] = 15
    """Equal-width confidence bins of the expected calibration error and the reliability diagram."""
    corruptions: Corruptions = "gaussian_noise,defocus_blur,jpeg_compression,brightness,contrast"
    """Comma-separated CIFAR-100-C corruptions (imagecorruptions names) the robustness stage applies."""
    corruption_severities: Annotated[tuple[Annotated[int, Field(ge=1, le=5)], ...], Field(min_length=1)] = (
        1, 2, 3, 4, 5,
    )  # fmt: skip
    """Severities (1-5) of every corruption."""
    robustness_images: PositiveInt = 1000
    """Test images (the first ones of the stored split) the robustness stage corrupts."""
    infra_images: Annotated[int, Field(ge=1, le=256)] = 8
    """Test images infra validation posts to the real consumer, as every content type it documents."""
    infra_timeout_seconds: PositiveFloat = 120.0
    """How long infra validation waits for the consumer to be ready (and for each answer)."""


class PipelineConfig(BaseModel):
    """Everything a pipeline run needs to know. Defaults are the seed recipe.

    The defaults reproduce the keras-io example "Image classification with Vision
    Transformer" (CIFAR-100): images resized to 72, patches of 6, projection 64,
    4 heads, 8 blocks, head MLP [2048, 1024], AdamW lr 1e-3, batch 256, 100
    epochs, 10% validation.

    Weight decay uses Keras semantics. ``keras.optimizers.AdamW`` decays weights by
    ``learning_rate * weight_decay * w`` each step, whereas the seed's
    tensorflow-addons AdamW decayed by ``weight_decay * w`` (not scaled by the
    learning rate). The seed's ``wd=1e-4`` at ``lr=1e-3`` is therefore
    ``weight_decay = 1e-4 / 1e-3 = 0.1`` here. Passing 1e-4 to Keras would decay
    1000x less than the seed did.

    The settings live in sections (``cfg.data``, ``cfg.model``, ``cfg.optimizer``,
    ``cfg.tracking``, ``cfg.export``, ``cfg.benchmark``); every field name is unique
    across them, so a field is also read, written in presets, CLI options, sweep
    files, flow parameters and MLflow params by its flat name (``cfg.epochs`` is
    ``cfg.optimizer.epochs``). Each field's docstring is its description (CLI
    ``--help``, Prefect UI, JSON schema).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: ExportConfig = ExportConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    gates: GatesConfig = GatesConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections_from_flat_names(cls, values: Any) -> Any:
        """Flat field names (presets, CLI, flow parameters, ``to_dict``) go to their sections."""
        if not isinstance(values, dict):
            return values
        nested: dict[str, Any] = {}
        for key, value in values.items():
            section = _SECTION_OF.get(key)
            if section is None:
                nested[key] = value  # a section given whole, or an unknown name (refused below)
            else:
                nested.setdefault(section, {})
                if isinstance(nested[section], dict):
                    nested[section][key] = value
        return nested

    def __getattr__(self, name: str) -> Any:
        section = _SECTION_OF.get(name)
        if section is not None:
            return getattr(self.__dict__[section], name)
        return super().__getattr__(name)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        """The rules that span fields (a JSON schema cannot state them)."""
        if self.image_size % self.patch_size:
            raise ValueError(
                "Expected patch_size to divide image_size. "
                f"Received: patch_size={self.patch_size}, image_size={self.image_size}"
            )
        if self.transformer_units[-1] != self.projection_dim:
            raise ValueError(
                "Expected the last of transformer_units to equal projection_dim (the block's residual "
                f"connection). Received: transformer_units={list(self.transformer_units)}, "
                f"projection_dim={self.projection_dim}"
            )
        if self.warmup_fraction > 0 and self.lr_schedule == "constant":
            raise ValueError(
                "Expected lr_schedule='warmup_cosine' when warmup_fraction > 0. "
                f"Received: lr_schedule='constant', warmup_fraction={self.warmup_fraction}"
            )
        if self.linear_probe_epochs >= self.epochs:
            raise ValueError(
                "Expected linear_probe_epochs < epochs (the whole network must train at least one epoch). "
                f"Received: linear_probe_epochs={self.linear_probe_epochs}, epochs={self.epochs}"
            )
        if self.backbone == "keras_hub":
            for name, value, allowed in (
                ("patch_tokenization", self.patch_tokenization, "standard"),
                ("attention_type", self.attention_type, "standard"),
            ):
                if value != allowed:
                    raise ValueError(
                        f"Expected {name}={allowed!r} with backbone='keras_hub' (a Keras-Hub ViT has no other). "
                        f"Received: {name}={value!r}"
                    )
            if self.pooling == "flatten":
                raise ValueError(
                    "Expected pooling 'class_token' or 'gap' with backbone='keras_hub'. Received: pooling='flatten'"
                )
            if self.stochastic_depth_rate > 0:
                raise ValueError(
                    "Expected stochastic_depth_rate=0 with backbone='keras_hub' (a Keras-Hub ViT has no drop path). "
                    f"Received: stochastic_depth_rate={self.stochastic_depth_rate}"
                )
            if (self.head_dim or self.projection_dim) * self.num_heads != self.projection_dim:
                raise ValueError(
                    "Expected head_dim * num_heads == projection_dim with backbone='keras_hub' (its heads split "
                    "the width). "
                    f"Received: head_dim={self.head_dim}, num_heads={self.num_heads}, "
                    f"projection_dim={self.projection_dim}"
                )
        if self.dataset == "image_folder" and not self.data_path:
            raise ValueError("Expected data_path for dataset='image_folder'. Received: data_path=None")
        # A source the dataset does not read was ignored: `--preset quickstart --data-path cifar.tar.gz`
        # trained on digits and said nothing.
        if self.dataset == "digits" and self.data_path:
            raise ValueError(
                "Expected no data_path for dataset='digits' (scikit-learn ships its images). "
                f"Received: data_path={self.data_path!r}; set dataset to 'cifar100' or 'image_folder' to read it"
            )
        if self.dataset != "cifar100" and self.label_mode != "fine":
            raise ValueError(
                "Expected label_mode='fine' unless dataset='cifar100' (only CIFAR-100 has coarse labels). "
                f"Received: label_mode={self.label_mode!r}, dataset={self.dataset!r}"
            )
        if self.dataset in ("digits", "cifar100") and self.input_size != 32:
            raise ValueError(
                f"Expected input_size=32 for dataset={self.dataset!r} (its native size). "
                f"Received: input_size={self.input_size}"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def soft_labels(self) -> bool:
        """Whether training needs one-hot (mixable, smoothable) labels."""
        return self.label_smoothing > 0 or self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def resolved_experiment_name(self) -> str:
        return self.experiment_name or f"vit-{self.dataset_tag}"

    @property
    def resolved_model_name(self) -> str:
        return self.registered_model_name or f"vit-{self.dataset_tag}"

    @property
    def dataset_tag(self) -> str:
        """Short name of the data, e.g. ``cifar100`` or ``cifar100-coarse``."""
        if self.dataset == "cifar100" and self.label_mode == "coarse":
            return "cifar100-coarse"
        if self.dataset_name:
            return self.dataset_name
        if self.dataset == "image_folder" and self.data_path:
            return folder_dataset_name(self.data_path)
        return self.dataset

    @property
    def serve_candidate_list(self) -> list[str]:
        """``serve_candidates`` as a list of variant names."""
        return split_names(self.serve_candidates)

    @property
    def benchmark_variant_list(self) -> list[str]:
        """``benchmark_variants`` as a list of variant names."""
        return split_names(self.benchmark_variants)

    @property
    def corruption_list(self) -> list[str]:
        """``corruptions`` as a list of names."""
        return split_names(self.corruptions)

    @property
    def benchmark_provider_list(self) -> list[str] | None:
        """``benchmark_providers`` as a list (None: every provider this onnxruntime has)."""
        return split_names(self.benchmark_providers or "") or None

    def to_dict(self) -> dict[str, Any]:
        """Every field by its flat name, in declaration order (MLflow params, flow parameters, ``from_dict``)."""
        return {name: getattr(getattr(self, section), name) for name, section in _SECTION_OF.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SECTIONS: dict[str, type[_Fields]] = {
    "data": DataConfig, "model": ModelConfig, "optimizer": OptimizerConfig, "tracking": TrackingConfig,
    "export": ExportConfig, "benchmark": BenchmarkConfig, "gates": GatesConfig,
}  # fmt: skip
# Flat field name -> its section, in declaration order (the order of CLI options and MLflow params).
_SECTION_OF: dict[str, str] = {
    name: section for section, model in SECTIONS.items() for name in model.model_fields
}
PipelineConfig.model_rebuild()

SPLIT_FOLDER_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")


def folder_dataset_name(path: str) -> str:
    """An image folder's dataset name: its base name (the parent's when it is a split folder
    such as ``ROOT/train``), as a slug for experiment and registry names."""
    import hashlib
    import os
    import unicodedata

    path = path.replace("\\", "/").rstrip("/")
    if any(p in (".", "..") for p in path.split("/")):  # ".", "../data": named by the folder they are
        path = os.path.abspath(path)
    parts = [p for p in path.split("/") if p]
    if len(parts) > 1 and parts[-1].lower() in SPLIT_FOLDER_NAMES:
        parts = parts[:-1]
    # One name for one folder whatever wrote it (macOS writes names decomposed, NFD: café was "cafe" there and
    # "caf" elsewhere); composed (NFC), the names of existing datasets stay as they were.
    name = unicodedata.normalize("NFC", parts[-1] if parts else "images")
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    # A name of other letters (写真/) keeps a name of its own: every one of them was "images", one schema
    # and one registered model for unrelated datasets.
    return slug or f"images-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


PRESETS_DIR = Path(__file__).parent / "presets"


def _load_presets(folder: Path = PRESETS_DIR) -> dict[str, dict[str, Any]]:
    """Named presets from ``folder/<name>.yaml``: values applied on top of the seed defaults.

    A file holds ``description``, ``values`` and optionally ``extends`` (another
    preset whose values it starts from); its comments give each choice's source.
    """
    import yaml

    docs = {
        p.stem: yaml.safe_load(p.read_text()) or {}
        for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stem)
    }

    def values(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        doc = docs.get(name)
        if doc is None or name in seen:
            raise ConfigError(
                f"Preset {seen[-1]!r} extends {name!r}, which is {'a cycle' if doc else 'unknown'}"
            )
        unknown = set(doc) - {"description", "values", "extends"}
        if unknown:
            raise ConfigError(f"Preset file {folder / name}.yaml has unknown keys {sorted(unknown)}")
        base = values(doc["extends"], (*seen, name)) if doc.get("extends") else {}
        return {**base, **(doc.get("values") or {})}

    return {name: values(name) for name in docs}


# Named presets (vit_pipeline/presets/*.yaml): overrides applied on top of the seed defaults.
# Read at import: the typed flow parameters (ConfigOverrides) describe each field with the presets' values.
PRESETS: dict[str, dict[str, Any]] = _load_presets()


def field_names() -> list[str]:
    """Every config field's flat name, in declaration order."""
    return list(_SECTION_OF)


def field_info(name: str):
    """A field's pydantic ``FieldInfo`` (type, constraints, default, description), by its flat name."""
    return SECTIONS[_SECTION_OF[name]].model_fields[name]


def field_description(name: str) -> str:
    """A field's description (its docstring), on one line."""
    return " ".join((field_info(name).description or "").split())


def field_metavar(name: str) -> str:
    """How a field's value is written on the command line, e.g. ``INTEGER`` or ``[fine|coarse]``."""
    optional, tp = _optional(field_info(name).annotation)
    tp = _base(tp)
    if typing.get_origin(tp) is Literal:
        text = "[" + "|".join(typing.get_args(tp)) + "]"
    elif typing.get_origin(tp) is tuple:
        text = "INT,INT,..."
    else:
        text = {int: "INTEGER", float: "FLOAT"}.get(tp, "TEXT")
    return f"{text}|none" if optional else text


def _optional(tp: Any) -> tuple[bool, Any]:
    """Returns (optional, inner type) for ``X | None`` annotations."""
    args = typing.get_args(tp)
    if type(None) in args:
        return True, next(a for a in args if a is not type(None))
    return False, tp


def _base(tp: Any) -> Any:
    """``Annotated[int, ...]`` -> ``int``; other types as they are."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _parse(name: str, annotation: Any, value: Any) -> Any:
    """Text to the field's type; anything it cannot parse goes on to pydantic's own error."""
    optional, tp = _optional(annotation)
    tp = _base(tp)
    if optional and (
        value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))
    ):
        return None
    if isinstance(value, bool) and tp in (int, float):  # pydantic would take True for 1
        raise ValueError(f"Expected {name} to be a number. Received: {name}={value!r}")
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if typing.get_origin(tp) is tuple:
            return parse_int_list(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        pass
    return value


def parse_int_list(value: Any) -> tuple[int, ...]:
    """``"2048, 1024"``, ``"[1,8]"`` or a sequence -> a tuple of ints (ValueError otherwise)."""
    if isinstance(value, str):
        parts = value.replace(" ", "").strip("[]()").split(",")
        if parts[-1] == "":  # "(512,)", "2048,1024,": a trailing comma ends the list
            parts.pop()
        if "" in parts:  # "1,,64": a number left out is a typo, not nothing
            raise ValueError(f"an empty item in {value!r}")
    else:
        parts = list(value)
    return tuple(int(p) for p in parts)


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(error: dict[str, Any]) -> str:
    """One pydantic error as this project's one-line "Expected ... Received: ..." message."""
    loc = [str(part) for part in error["loc"]]
    if len(loc) > 1 and loc[0] in SECTIONS:  # a field of a section: named by its flat name
        loc = loc[1:]
    name = loc[0] if loc else ""
    value = error.get("input")
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == "value_error":  # raised by a validator here: already a full message
        return str(ctx.get("error", error["msg"]))
    if kind == "extra_forbidden":
        return f"Unknown config field {name!r}. Known fields: {', '.join(field_names())}"
    what = name if len(loc) == 1 else f"every item of {name}"
    received = f"Received: {name}{''.join(f'[{i}]' for i in loc[1:])}={value!r}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"Expected {what} {_BOUNDS[kind]} {bound}. {received}"
    if kind == "literal_error":
        return f"Expected {name} in {ctx.get('expected')}. {received}"
    if kind == "string_pattern_mismatch":
        return f"Expected {name} to be {_EXPECTED.get(name, 'of the pattern ' + str(ctx.get('pattern')))}. {received}"
    if kind.startswith(("int_", "float_")):
        return f"Expected {what} to be {'an integer' if kind.startswith('int_') else 'a number'}. {received}"
    if kind in ("tuple_type", "list_type", "too_short"):
        return f"Expected {name} to be a comma-separated list of integers. {received}"
    return f"Expected {name}: {error['msg']}. {received}"


def config_error(exc: ValidationError) -> ConfigError:
    """The first problem of a ValidationError as a ConfigError (one line)."""
    return ConfigError(_message(exc.errors(include_url=False)[0]))


def _overrides_model() -> type[BaseModel]:
    """``PipelineConfig`` with every field optional: None keeps the preset's value.

    The same types, constraints and descriptions; each description ends with the
    seed's default and the presets that change it.
    """
    fields: dict[str, Any] = {}
    for name in field_names():
        info = field_info(name)
        tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        changed = [f"{p}: {_show(values[name])}" for p, values in PRESETS.items() if name in values]
        default = f"Default: the preset's; seed {_show(info.default)}" + (
            f" ({', '.join(changed)})" if changed else ""
        )
        fields[name] = (tp | None, Field(default=None, description=f"{field_description(name)} {default}."))
    return create_model(
        "ConfigOverrides",
        __base__=_Fields,
        __doc__="Config fields that replace the preset's values (null or absent: the preset's).",
        **fields,
    )


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


ConfigOverrides = _overrides_model()
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


def coerce(name: str, value: Any) -> Any:
    """Converts a CLI string or a JSON value to the field's type (field constraints checked).

    Raises:
        ConfigError: if the field is unknown or the value has the wrong type.
    """
    try:
        return getattr(ConfigOverrides(**{name: value}), name)
    except ValidationError as exc:
        raise config_error(exc) from None


def merged_overrides(
    overrides: dict[str, Any] | None = None, config: BaseModel | dict[str, Any] | None = None
) -> dict[str, Any]:
    """Untyped ``overrides`` with the set fields of a typed ``config`` on top (config wins)."""
    typed = config.model_dump() if isinstance(config, BaseModel) else dict(config or {})
    return {**(overrides or {}), **{k: v for k, v in typed.items() if v is not None}}


def make_config(
    preset: str = "quickstart",
    overrides: dict[str, Any] | None = None,
    config: BaseModel | dict[str, Any] | None = None,
) -> PipelineConfig:
    """Builds and validates a config from a preset and field values.

    Args:
        preset: A key of ``PRESETS``.
        overrides: Field name to value; strings are parsed to the field's type (the
            untyped compatibility path of the flows).
        config: A ``ConfigOverrides`` (or its dict): set fields replace the preset's,
            and ``overrides``.

    Raises:
        ConfigError: unknown preset or field, wrong type, or invalid value.
    """
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset. Expected one of {tuple(PRESETS)}. Received: preset={preset!r}")
    explicit = merged_overrides(overrides, config)
    values = {**PRESETS[preset], **explicit}
    try:
        if values.get("init_from"):  # the checkpoint's architecture, where the user did not set it
            from vit_pipeline.finetune import adopt

            values = adopt(values, set(explicit))
        return PipelineConfig(**values)
    except ValidationError as exc:
        raise config_error(exc) from None


def from_dict(values: dict[str, Any]) -> PipelineConfig:
    """Rebuilds a config from ``to_dict()`` output (e.g. passed between tasks)."""
    try:
        return PipelineConfig(**values)
    except ValidationError as exc:
        raise config_error(exc) from None


__all__ = [
    "PRESETS",
    "ConfigOverrides",
    "PipelineConfig",
    "PresetName",
    "coerce",
    "field_names",
    "from_dict",
    "make_config",
]
