"""Where a run's first weights come from: ``init_from`` (fine-tuning instead of training from scratch).

A source is one of

* a model of this project: ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the Keras model
  of the run that registered that version), ``runs:/<run id>/keras-model``, or a ``.keras`` file;
* a Keras-Hub ViT preset: a name or handle (``vit_base_patch16_224_imagenet``, ``kaggle://...``,
  ``hf://...``; downloaded by Keras-Hub when online) or a local preset folder (air-gapped);
* a Hugging Face ViT checkpoint folder (``config.json`` + ``model.safetensors``, the layout of
  ``google/vit-base-patch16-224``), read by Keras-Hub's own converter.

Three steps, each in one function:

1. :func:`resolve` pins the source (``models:/x@champion`` -> ``models:/x/3``), fetches it to a local
   path and computes its digest.
2. :func:`adopt` takes the architecture the checkpoint fixes into the config (fields set explicitly
   must agree, or the run fails before training with one line naming both values); ``image_size``
   and the head may differ.
3. :func:`build_model` builds the new model and copies the weights: the backbone always, the head
   only when the class names match; position embeddings are interpolated (bicubic, as timm's
   ``resample_abs_pos_embed``) when the patch grid changes. What was copied, interpolated and newly
   initialised is returned as an :class:`InitReport` (MLflow params and tags of the run, tags of
   the registered version).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline.errors import ConfigError
from vit_pipeline.mlflow_models import keras_file

if TYPE_CHECKING:
    import keras

    from vit_pipeline.config import PipelineConfig
    from vit_pipeline.data import Splits

log = logging.getLogger(__name__)

OWN = "vit_pipeline"  # a model of this project (our layers)
KERAS_HUB = "keras_hub"  # a Keras-Hub ViTBackbone (its own presets and Hugging Face checkpoints)

# Architecture fields a checkpoint may differ in: the grid is interpolated, the head is rebuilt.
BRIDGEABLE = ("image_size", "mlp_head_units")


@dataclass(frozen=True)
class Source:
    """A pinned, local, digested checkpoint.

    Attributes:
        requested: What the user gave (``models:/vit-cifar100@champion``).
        uri: The pinned source (``models:/vit-cifar100/3``; a path, absolute; a preset handle as given).
        kind: ``"vit_pipeline"`` (this project's layers) or ``"keras_hub"``.
        format: ``"keras"``, ``"keras_hub_preset"`` or ``"huggingface"``.
        path: The local ``.keras`` file or checkpoint folder.
        digest: ``sha256:`` of the file, or of the folder's files (names and contents).
        class_names: The classes the checkpoint's head was trained on, when known.
        run_id: The MLflow run that produced it (models of this project).
    """

    requested: str
    uri: str
    kind: str
    format: str
    path: str
    digest: str
    class_names: tuple[str, ...] | None = None
    run_id: str | None = None


@dataclass
class InitReport:
    """What :func:`build_model` did with each weight of the new model."""

    source: Source
    copied: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    head: str = "new"  # "copied" (class names match) or "new"
    normalization: str = "checkpoint"  # where the input statistics come from

    def params(self) -> dict[str, str]:
        """MLflow params of the run (immutable: the same on a resume)."""
        return {
            "init.source": self.source.uri,
            "init.source_digest": self.source.digest,
            "init.kind": self.source.kind,
            "init.format": self.source.format,
            "init.tensors_copied": str(len(self.copied)),
            "init.tensors_interpolated": str(len(self.interpolated)),
            "init.tensors_new": str(len(self.new)),
            "init.head": self.head,
            "init.normalization": self.normalization,
        }

    def tags(self) -> dict[str, str]:
        """Lineage tags (run and registered version): where the weights came from."""
        tags = {
            "init.source": self.source.uri,
            "init.source_digest": self.source.digest,
        }
        if self.source.run_id:
            tags["init.source_run_id"] = self.source.run_id
        return tags

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> InitReport:
        source = values["source"]
        names = source.get("class_names")
        return cls(
            **{**values, "source": Source(**{**source, "class_names": tuple(names) if names else None})}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": dict(self.source.__dict__),
            "copied": self.copied,
            "interpolated": self.interpolated,
            "new": self.new,
            "head": self.head,
            "normalization": self.normalization,
        }


# --------------------------------------------------------------------------- 1. resolve
def digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file, or of every file in a folder (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def resolve(requested: str, tracking_uri: str | None = None) -> Source:
    """Pins and fetches ``requested`` (see the module docstring for the forms).

    Args:
        requested: The ``init_from`` value.
        tracking_uri: The MLflow store of ``models:/`` and ``runs:/`` sources (None: the pipeline's
            default, ``vit_pipeline.tracking.tracking_uri``).

    Raises:
        ConfigError: the source does not exist, cannot be fetched, or is not a checkpoint this
            project can start from (one line naming it).
    """
    from vit_pipeline import tracking

    return _resolve(requested.strip(), tracking_uri or tracking.tracking_uri(None))


@functools.lru_cache(maxsize=8)  # config time and training time fetch once per process
def _resolve(requested: str, tracking_uri: str) -> Source:
    if requested.startswith(("models:/", "runs:/")):
        return _resolve_mlflow(requested, tracking_uri)
    path = Path(requested).expanduser()
    if path.exists():
        return _resolve_local(requested, path.resolve())
    if requested.endswith(".keras") or requested.startswith((".", "/", "~")) or "\\" in requested:
        raise ConfigError(f"init_from does not exist. Received: init_from={requested!r}")
    return _resolve_preset_handle(requested)


def _resolve_local(requested: str, path: Path) -> Source:
    if path.is_file():
        if path.suffix != ".keras":
            raise ConfigError(
                "Expected init_from to be a .keras file or a checkpoint folder. "
                f"Received: init_from={requested!r} (a {path.suffix or 'suffix-less'} file)"
            )
        return Source(requested, str(path), OWN, "keras", str(path), digest(path))
    file = keras_file(path) if (path / "MLmodel").exists() else None
    if file is not None:  # a downloaded MLflow Keras model
        return Source(requested, str(path), OWN, "keras", str(file), digest(file))
    config_file = path / "config.json"
    if not config_file.exists():
        raise ConfigError(
            "Expected init_from to be a Keras-Hub preset or Hugging Face checkpoint folder (with config.json). "
            f"Received: init_from={requested!r} (no config.json)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Could not read {config_file}: {exc}") from None
    if "model_type" in config:
        fmt = "huggingface"
        if config["model_type"] != "vit":
            raise ConfigError(
                "Expected a Hugging Face ViT checkpoint (model_type 'vit'). "
                f"Received: model_type={config['model_type']!r} in {config_file}"
            )
        if config.get("hidden_act", "gelu") != "gelu":  # Keras-Hub's ViT computes GELU whatever the file says
            raise ConfigError(
                "Expected a Hugging Face ViT with hidden_act 'gelu' (the activation Keras-Hub's ViT computes). "
                f"Received: hidden_act={config['hidden_act']!r} in {config_file}"
            )
    elif "class_name" in config:
        fmt = "keras_hub_preset"
        if config["class_name"] != "ViTBackbone":
            raise ConfigError(
                "Expected a Keras-Hub ViTBackbone preset. "
                f"Received: class_name={config['class_name']!r} in {config_file}"
            )
    else:
        raise ConfigError(
            "Expected a Keras-Hub preset or Hugging Face config.json (with class_name or model_type). "
            f"Received: {config_file} with keys {sorted(config)[:8]}"
        )
    return Source(requested, str(path), KERAS_HUB, fmt, str(path), digest(path), _hf_class_names(config))


def _hf_class_names(config: dict[str, Any]) -> tuple[str, ...] | None:
    labels = config.get("id2label")
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        return tuple(str(labels[k]) for k in sorted(labels, key=int))
    except (TypeError, ValueError):
        return None


def _resolve_preset_handle(requested: str) -> Source:
    """A Keras-Hub preset name or handle: Keras-Hub downloads (or finds in its cache) the files."""
    try:
        from keras_hub.src.utils.preset_utils import get_file

        config_path = Path(get_file(requested, "config.json"))
        get_file(requested, "model.weights.h5")
    except Exception as exc:  # offline, unknown name, ...: Keras-Hub's own reason
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(
            f"Could not fetch the Keras-Hub preset init_from={requested!r} ({type(exc).__name__}: {reason}); "
            "offline, give the preset's local folder"
        ) from None
    local = _resolve_local(requested, config_path.parent)
    return Source(requested, requested, local.kind, local.format, local.path, local.digest, local.class_names)


def _resolve_mlflow(requested: str, tracking_uri: str) -> Source:
    """``models:/`` (pinned to a version; the Keras model of the run that registered it) or ``runs:/``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from vit_consumer.mlflow_store import store_uris

    from vit_pipeline.fsutil import scratch_dir
    from vit_pipeline.mlflow_models import KERAS_ARTIFACT

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if requested.startswith("models:/"):
            name, version = _registered_version(client, requested)
            run_id = version.run_id
            pinned = f"models:/{name}/{version.version}"
            keras_uri = client.get_run(run_id).data.tags.get(
                "train.keras_model_uri", f"runs:/{run_id}/{KERAS_ARTIFACT}"
            )
        else:
            match = re.match(r"^runs:/([^/]+)(/.*)?$", requested)
            if not match:
                raise ConfigError(f"Expected runs:/<run id>/<path>. Received: init_from={requested!r}")
            run_id = match.group(1)
            client.get_run(run_id)  # fails clearly when the run does not exist
            # runs:/<id> alone: the run's Keras model, where the pipeline logs it.
            pinned = keras_uri = (
                requested if (match.group(2) or "/") != "/" else f"runs:/{run_id}/{KERAS_ARTIFACT}"
            )
        dst = scratch_dir("vit-init-")  # the process's scratch folder: removed at exit, or after a kill
        with store_uris(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=keras_uri, dst_path=str(dst)))
            names = _run_class_names(run_id, dst)
    except MlflowException as exc:
        raise ConfigError(
            f"Could not fetch init_from={requested!r} from {tracking_uri}: {' '.join(str(exc).split())[:300]}"
        ) from None
    file = keras_file(local)
    if file is None:
        raise ConfigError(
            f"Expected a Keras model at init_from={requested!r}. Received: no .keras file in {keras_uri}"
        )
    return Source(requested, pinned, OWN, "keras", str(file), digest(file), names, run_id)


def _registered_version(client, uri: str):
    body = uri.removeprefix("models:/")
    name, sep, alias = body.partition("@")
    if sep:
        return name, client.get_model_version_by_alias(name, alias)
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(
            f"Expected models:/<name>@<alias> or models:/<name>/<version>. Received: init_from={uri!r}"
        )
    return name, client.get_model_version(name, version)


def _run_class_names(run_id: str, dst: Path) -> tuple[str, ...] | None:
    """The classes of a run of this project (its ``data/dataset.json``), if it logged them."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="data/dataset.json", dst_path=str(dst)
        )
        return tuple(json.loads(Path(path).read_text())["class_names"])
    except Exception:  # an older run without the file: the head is then always new
        return None


# --------------------------------------------------------------------------- 2. adopt
def architecture(source: Source) -> dict[str, Any]:
    """The config fields the checkpoint fixes, as the checkpoint has them."""
    return dict(_architecture(source))


@functools.lru_cache(maxsize=8)  # every make_config of a run reads it: load a (large) checkpoint once
def _architecture(source: Source) -> dict[str, Any]:
    if source.kind == KERAS_HUB:
        return _keras_hub_architecture(_load_keras_hub_backbone(source))
    return _own_architecture(_load_own(source))


def _own_architecture(model: keras.Model) -> dict[str, Any]:
    by_name = {layer.name: layer for layer in model.layers}

    def need(name: str):
        if name not in by_name:
            raise ConfigError(
                f"Expected a ViT of this project (a layer named {name!r}). Received: a model named "
                f"{model.name!r} with layers {[layer.name for layer in model.layers][:6]}..."
            )
        return by_name[name]

    pooling = "flatten" if "head_flatten" in by_name else "gap" if "head_pool" in by_name else "class_token"
    head_units = _numbered_units(by_name, "head_mlp_dense")
    if (
        "backbone" in by_name and type(by_name["backbone"]).__name__ == "ViTBackbone"
    ):  # fine-tuned from Keras-Hub
        return {
            **_keras_hub_architecture(by_name["backbone"]),
            "pooling": pooling,
            "mlp_head_units": head_units,
        }
    encoder = need("patch_encoder")
    blocks = sorted(int(m.group(1)) for n in by_name if (m := re.fullmatch(r"block(\d+)_ln1", n)))
    attention = need("block0_attention")
    lsa = type(attention).__name__ == "LocalitySelfAttention"
    head_dim = attention.head_dim if lsa else attention.key_dim
    units = _numbered_units(by_name, "block0_mlp_dense")
    image_size = by_name["resizing"].height if "resizing" in by_name else model.input_shape[1]
    return {
        "backbone": OWN,
        "image_size": int(image_size),
        "patch_size": int(need("patches").patch_size),
        "projection_dim": int(encoder.projection_dim),
        "num_heads": int(attention.num_heads),
        "head_dim": None if head_dim == encoder.projection_dim else int(head_dim),
        "transformer_layers": len(blocks),
        "transformer_units": units,
        "mlp_head_units": head_units,
        "pooling": pooling,
        "patch_tokenization": "shifted" if "shifted_images" in by_name else "standard",
        "attention_type": "lsa" if lsa else "standard",
    }


def _numbered_units(by_name: dict[str, Any], prefix: str) -> tuple[int, ...]:
    """Widths of the Dense layers ``<prefix>0``, ``<prefix>1``, ... in index order (10 after 9)."""
    found = {
        int(m.group(1)): layer for n, layer in by_name.items() if (m := re.fullmatch(rf"{prefix}(\d+)", n))
    }
    return tuple(int(found[i].units) for i in sorted(found))


def _keras_hub_architecture(backbone) -> dict[str, Any]:
    patch = backbone.patch_size[0] if isinstance(backbone.patch_size, list | tuple) else backbone.patch_size
    return {
        "backbone": KERAS_HUB,
        "image_size": int(backbone.image_shape[0]),
        "patch_size": int(patch),
        "projection_dim": int(backbone.hidden_dim),
        "num_heads": int(backbone.num_heads),
        "head_dim": int(backbone.hidden_dim // backbone.num_heads),
        "transformer_layers": int(backbone.num_layers),
        "transformer_units": (int(backbone.mlp_dim), int(backbone.hidden_dim)),
        "mlp_head_units": (),
        "pooling": "class_token" if backbone.use_class_token else "gap",
        "patch_tokenization": "standard",
        "attention_type": "standard",
        "stochastic_depth_rate": 0.0,
    }


def _effective(name: str, value: Any, values: dict[str, Any]) -> Any:
    """A field as the model reads it (``head_dim`` None is ``projection_dim``; lists as tuples)."""
    if name == "head_dim" and value is None:
        from vit_pipeline.config import coerce

        return coerce("projection_dim", values.get("projection_dim"))
    return tuple(value) if isinstance(value, list) else value


def adopt(values: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The config values with the checkpoint's architecture in them and ``init_from`` pinned.

    Args:
        values: The config's flat values (preset + overrides).
        explicit: Field names the user set (CLI options, flow parameters, sweep values); a preset's
            values are not explicit, so a preset's architecture gives way to the checkpoint's.

    Raises:
        ConfigError: an explicit field the checkpoint fixes differs from the checkpoint's value
            (``image_size`` and the head may differ: they are bridged).
    """
    from vit_pipeline.config import coerce

    source = resolve(str(values["init_from"]), values.get("tracking_uri"))
    arch = architecture(source)
    out = {**values, "init_from": source.uri}
    for name, value in arch.items():
        if name in explicit and name not in BRIDGEABLE:
            mine = _effective(name, coerce(name, values.get(name)), values)
            theirs = _effective(name, value, arch)
            if mine != theirs:
                raise ConfigError(
                    f"Expected {name} to match the checkpoint's. Received: {name}={_show(mine)}, "
                    f"checkpoint {name}={_show(theirs)} (init_from={source.uri})"
                )
        elif name not in explicit:
            out[name] = value
    return out


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


# --------------------------------------------------------------------------- 3. build
def build_model(cfg: PipelineConfig, splits: Splits) -> tuple[keras.Model, InitReport | None]:
    """The model to train: fresh (no ``init_from``) or initialised from the checkpoint."""
    from vit_pipeline.model import build_vit

    if not cfg.init_from:
        return build_vit(cfg, splits.num_classes, splits.input_shape, train_images=splits.x_train), None
    source = resolve(cfg.init_from, cfg.tracking.tracking_uri)
    keep_head = source.class_names is not None and tuple(source.class_names) == tuple(splits.class_names)
    if source.kind == KERAS_HUB:
        return _from_keras_hub(cfg, splits, source, keep_head)
    return _from_own(cfg, splits, source, keep_head)


def _from_own(cfg: PipelineConfig, splits: Splits, source: Source, keep_head: bool):
    from vit_pipeline.model import build_vit
    from vit_pipeline.optimizer import is_head

    src = _load_own(source)
    model = build_vit(cfg, splits.num_classes, splits.input_shape, train_images=None)
    src_layers = {layer.name: layer for layer in src.layers}
    if keep_head and not _head_fits(model, src_layers, is_head):
        # E.g. Flatten over another patch grid: the first head layer's kernel is new, and the layers after it
        # would read features they were never trained on. The head is new as a whole.
        keep_head = False
    report = InitReport(source, head="copied" if keep_head else "new")
    for layer in model.layers:
        if not layer.weights:
            continue
        head = is_head(f"{layer.name}/")  # the optimizer's definition: the head's Dense layers, not head_ln
        other = src_layers.get(layer.name)
        theirs = {_relative(w.path, other.name): w for w in other.weights} if other is not None else {}
        for w in layer.weights:
            key = _relative(w.path, layer.name)
            s = theirs.get(key)
            if s is None or (head and not keep_head):
                report.new.append(w.path)
            elif tuple(s.shape) == tuple(w.shape):
                w.assign(s.numpy())
                report.copied.append(w.path)
            elif "position_embedding" in w.path:
                prefix = 1 if cfg.pooling == "class_token" else 0
                w.assign(interpolate_positions(s.numpy(), tuple(w.shape)[0] - prefix, prefix))
                report.interpolated.append(w.path)
            else:
                raise ConfigError(
                    f"Expected the checkpoint's {w.path} to have shape {tuple(w.shape)}. "
                    f"Received: {tuple(s.shape)} (init_from={source.uri})"
                )
    return model, report


def _head_fits(model, src_layers: dict, is_head) -> bool:
    """Whether every weight of the model's head has a checkpoint weight of the same shape."""
    for layer in model.layers:
        if not (layer.weights and is_head(f"{layer.name}/")):
            continue
        other = src_layers.get(layer.name)
        theirs = (
            {_relative(w.path, other.name): tuple(w.shape) for w in other.weights}
            if other is not None
            else {}
        )
        if any(theirs.get(_relative(w.path, layer.name)) != tuple(w.shape) for w in layer.weights):
            return False
    return True


def _relative(path: str, layer_name: str) -> str:
    """A variable's path inside its layer (``patch_encoder/projection/kernel`` -> ``projection/kernel``)."""
    return path.split(f"{layer_name}/", 1)[-1]


def _from_keras_hub(cfg: PipelineConfig, splits: Splits, source: Source, keep_head: bool):
    import keras_hub

    from vit_pipeline.model import build_vit

    src = _load_keras_hub_backbone(source)
    config = {
        **src.get_config(),
        "image_shape": (cfg.image_size, cfg.image_size, 3),
        "dropout_rate": cfg.mlp_dropout,
        "attention_dropout": cfg.attention_dropout,
        "name": "backbone",
    }
    backbone = keras_hub.models.ViTBackbone.from_config(config)
    report = InitReport(source, head="new")
    prefix = 1 if src.use_class_token else 0
    for w, s in zip(backbone.weights, src.weights, strict=True):
        if tuple(w.shape) == tuple(s.shape):
            w.assign(s.numpy())
            report.copied.append(f"backbone/{w.path}")
        elif "position_embedding" in w.path:
            w.assign(interpolate_positions(s.numpy(), tuple(w.shape)[0] - prefix, prefix))
            report.interpolated.append(f"backbone/{w.path}")
        else:  # the same config but for the image shape: only the positions can differ
            raise ConfigError(f"Expected {w.path} of shape {tuple(w.shape)}. Received: {tuple(s.shape)}")
    stats = input_statistics(source)
    model = build_vit(
        cfg,
        splits.num_classes,
        splits.input_shape,
        train_images=None if stats else splits.x_train,
        backbone=backbone,
    )
    norm = model.get_layer("normalization")
    if stats:
        mean, std = stats
        norm.adapt_mean.assign(np.asarray(mean, np.float32).reshape(norm.adapt_mean.shape))
        norm.adapt_variance.assign(np.square(np.asarray(std, np.float32)).reshape(norm.adapt_variance.shape))
    else:
        report.normalization = "adapted on the training images (the checkpoint states none)"
    from_backbone = {id(w) for w in backbone.weights}
    report.new = [
        w.path
        for w in model.weights
        if id(w) not in from_backbone and w.path.split("/")[0] != "normalization"
    ]
    return model, report


def input_statistics(source: Source) -> tuple[list[float], list[float]] | None:
    """Per-channel ``(mean, std)`` in 0-255 pixels the checkpoint was trained with, if it says.

    Keras-Hub presets: ``image_converter.json`` (``x * scale + offset``); Hugging Face:
    ``preprocessor_config.json`` (``(x * rescale_factor - image_mean) / image_std``).
    """
    folder = Path(source.path)
    hub = folder / "image_converter.json"
    hf = folder / "preprocessor_config.json"
    if hub.exists():
        conf = json.loads(hub.read_text()).get("config", {})
        scale, offset = conf.get("scale"), conf.get("offset")
        if scale is None:
            return None
        scale = np.broadcast_to(np.asarray(scale, np.float64), (3,))
        offset = np.broadcast_to(np.asarray(offset if offset is not None else 0.0, np.float64), (3,))
        return (-offset / scale).tolist(), (1.0 / scale).tolist()
    if hf.exists():
        conf = json.loads(hf.read_text())
        if not conf.get("do_normalize", True) or "image_mean" not in conf:
            return None
        rescale = float(conf.get("rescale_factor", 1 / 255)) if conf.get("do_rescale", True) else 1.0
        mean = np.asarray(conf["image_mean"], np.float64) / rescale
        std = np.asarray(conf["image_std"], np.float64) / rescale
        return mean.tolist(), std.tolist()
    return None


def interpolate_positions(table: np.ndarray, new_tokens: int, prefix: int) -> np.ndarray:
    """Resizes a learned position-embedding table to another square patch grid.

    Args:
        table: ``(prefix + old_grid**2, dim)``.
        new_tokens: ``new_grid**2``.
        prefix: Leading tokens that have no grid position (the class token), kept as they are.

    Returns:
        The table itself when the grid is unchanged (bit for bit), else the grid part resized
        bicubically (as timm's ``resample_abs_pos_embed``), the prefix unchanged.
    """
    old_tokens = table.shape[0] - prefix
    old, new = math.isqrt(old_tokens), math.isqrt(new_tokens)
    if old * old != old_tokens or new * new != new_tokens:
        raise ConfigError(
            f"Expected square patch grids. Received: {old_tokens} positions in the checkpoint, {new_tokens} wanted"
        )
    if old == new:
        return table
    import keras

    grid = table[prefix:].reshape(1, old, old, -1).astype(np.float32)
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(grid, (new, new), interpolation="bicubic", antialias=False)
    ).reshape(new * new, -1)
    return np.concatenate([table[:prefix], resized.astype(table.dtype)], axis=0)


# --------------------------------------------------------------------------- loading
def _load_own(source: Source):
    from vit_pipeline.model import load_model

    try:
        return load_model(source.path)
    except Exception as exc:
        raise ConfigError(
            f"Could not load init_from={source.requested!r} as a Keras model ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]})"
        ) from None


def _load_keras_hub_backbone(source: Source):
    import keras_hub

    try:
        backbone = keras_hub.models.Backbone.from_preset(source.path)
    except Exception as exc:
        raise ConfigError(
            f"Could not load init_from={source.requested!r} with Keras-Hub ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(backbone, keras_hub.models.ViTBackbone):
        raise ConfigError(
            f"Expected a ViT backbone. Received: {type(backbone).__name__} (init_from={source.requested!r})"
        )
    return backbone
