"""Fine-tuning: checkpoints of each kind made here, loaded, adopted, interpolated; the recipe's optimizer."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from vit_pipeline import finetune
from vit_pipeline.config import make_config
from vit_pipeline.data import Splits
from vit_pipeline.errors import ConfigError

HUB = {
    "image_shape": (32, 32, 3),
    "patch_size": 8,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 16,
    "mlp_dim": 32,
}


def splits(num_classes: int = 3, names: list[str] | None = None, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24) % num_classes
    names = names or [f"c{i}" for i in range(num_classes)]
    return Splits(x, y, x[:6], y[:6], x[:6], y[:6], names)


def randomise(model, seed: int = 1) -> None:
    """Non-trivial weights everywhere (fresh biases are zeros: copying them would prove little)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(0, 0.5, tuple(w.shape)).astype(w.dtype))


@pytest.fixture
def hub_preset(tmp_path):
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(**HUB)
    randomise(backbone)
    path = tmp_path / "hub-preset"
    backbone.save_to_preset(str(path))
    return path, backbone


def hf_checkpoint(path, image_size=32, patch=8, layers=2, heads=2, dim=16, mlp=32, seed=3, mean=None):
    """A Hugging Face ViT folder (``config.json`` + ``model.safetensors``, ``ViTForImageClassification`` keys)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def t(*shape):
        return rng.normal(0, 0.5, shape).astype(np.float32)

    n = (image_size // patch) ** 2 + 1
    w = {
        "vit.embeddings.cls_token": t(1, 1, dim),
        "vit.embeddings.position_embeddings": t(1, n, dim),
        "vit.embeddings.patch_embeddings.projection.weight": t(dim, 3, patch, patch),
        "vit.embeddings.patch_embeddings.projection.bias": t(dim),
        "vit.layernorm.weight": t(dim),
        "vit.layernorm.bias": t(dim),
        "classifier.weight": t(5, dim),
        "classifier.bias": t(5),
    }
    for i in range(layers):
        p = f"vit.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            w[f"{p}.attention.attention.{name}.weight"], w[f"{p}.attention.attention.{name}.bias"] = (
                t(dim, dim),
                t(dim),
            )
        w[f"{p}.attention.output.dense.weight"], w[f"{p}.attention.output.dense.bias"] = t(dim, dim), t(dim)
        for ln in ("layernorm_before", "layernorm_after"):
            w[f"{p}.{ln}.weight"], w[f"{p}.{ln}.bias"] = t(dim), t(dim)
        w[f"{p}.intermediate.dense.weight"], w[f"{p}.intermediate.dense.bias"] = t(mlp, dim), t(mlp)
        w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"] = t(dim, mlp), t(dim)
    path.mkdir(parents=True)
    save_file(w, str(path / "model.safetensors"))
    config = {
        "model_type": "vit", "architectures": ["ViTForImageClassification"], "image_size": image_size,
        "patch_size": patch, "num_channels": 3, "num_hidden_layers": layers, "num_attention_heads": heads,
        "hidden_size": dim, "intermediate_size": mlp, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "qkv_bias": True, "layer_norm_eps": 1e-12,
        "id2label": {str(i): f"label{i}" for i in range(5)},
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    if mean is not None:
        (path / "preprocessor_config.json").write_text(json.dumps({
            "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [mean] * 3,
            "image_std": [0.5] * 3,
        }))  # fmt: skip
    return path, w


# ----------------------------------------------------------------- Keras-Hub preset
def test_keras_hub_preset_is_adopted_and_copied_bit_for_bit(hub_preset):
    path, source = hub_preset
    cfg = make_config("quickstart", {"init_from": str(path)})
    # The preset's architecture (quickstart: width 32, 2 heads, ...) gave way to the checkpoint's.
    assert (cfg.backbone, cfg.projection_dim, cfg.num_heads, cfg.head_dim, cfg.transformer_layers) == (
        "keras_hub", 16, 2, 8, 2,
    )  # fmt: skip
    assert (cfg.patch_size, tuple(cfg.transformer_units), cfg.pooling, tuple(cfg.mlp_head_units)) == (
        8, (32, 16), "class_token", (),
    )  # fmt: skip
    model, report = finetune.build_model(cfg, splits())
    copied = model.get_layer("backbone").weights
    assert len(copied) == len(source.weights) == len(report.copied)
    for mine, theirs in zip(copied, source.weights, strict=True):
        assert np.array_equal(mine.numpy(), theirs.numpy()), mine.path
    assert report.interpolated == [] and sorted(report.new) == ["logits/bias", "logits/kernel"]
    assert report.params()["init.format"] == "keras_hub_preset"
    assert report.params()["init.source_digest"] == finetune.digest(path)


def test_position_embeddings_are_interpolated_for_another_image_size(hub_preset):
    path, source = hub_preset
    cfg = make_config("quickstart", {"init_from": str(path), "image_size": 64})  # 4x4 grid -> 8x8
    model, report = finetune.build_model(cfg, splits())
    assert len(report.interpolated) == 1 and "position_embedding" in report.interpolated[0]
    table = model.get_layer("backbone").get_layer("vit_patching_and_embedding").position_embedding.embeddings
    theirs = source.get_layer("vit_patching_and_embedding").position_embedding.embeddings.numpy()
    assert tuple(table.shape) == (65, 16)
    assert np.array_equal(table.numpy()[0], theirs[0])  # the class token's position is kept
    assert model.predict(splits().x_test[:2], verbose=0).shape == (2, 3)


def test_interpolation_keeps_an_unchanged_grid_bit_for_bit_and_a_constant_constant():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(1 + 16, 8)).astype(np.float32)
    assert finetune.interpolate_positions(table, 16, prefix=1) is table
    flat = np.concatenate([table[:1], np.full((16, 8), 0.25, np.float32)])
    out = finetune.interpolate_positions(flat, 36, prefix=1)
    assert out.shape == (37, 8)
    np.testing.assert_array_equal(out[0], table[0])
    np.testing.assert_allclose(out[1:], 0.25, atol=1e-6)
    with pytest.raises(ConfigError, match="square patch grids"):
        finetune.interpolate_positions(table, 15, prefix=1)


# ----------------------------------------------------------------- Hugging Face folder
def test_hugging_face_folder_loads_through_keras_hub_converter(tmp_path):
    path, hf = hf_checkpoint(tmp_path / "hf", mean=0.5)
    cfg = make_config("quickstart", {"init_from": str(path)})
    model, report = finetune.build_model(cfg, splits())
    assert report.source.format == "huggingface" and report.head == "new"
    embed = model.get_layer("backbone").get_layer("vit_patching_and_embedding")
    np.testing.assert_array_equal(embed.class_token.numpy(), hf["vit.embeddings.cls_token"])
    np.testing.assert_array_equal(
        embed.position_embedding.embeddings.numpy(), hf["vit.embeddings.position_embeddings"][0]
    )
    np.testing.assert_array_equal(
        embed.patch_embedding.kernel.numpy(),
        np.transpose(hf["vit.embeddings.patch_embeddings.projection.weight"], (2, 3, 1, 0)),
    )
    block = model.get_layer("backbone").get_layer("vit_encoder").encoder_layers[1]
    np.testing.assert_array_equal(
        block.mlp.dense_1.kernel.numpy(), hf["vit.encoder.layer.1.intermediate.dense.weight"].T
    )
    # The input statistics the checkpoint was trained with (mean 0.5, std 0.5 of [0, 1]) are the model's.
    norm = model.get_layer("normalization")
    np.testing.assert_allclose(norm.adapt_mean.numpy().ravel(), [127.5] * 3)
    np.testing.assert_allclose(np.sqrt(norm.adapt_variance.numpy().ravel()), [127.5] * 3)
    assert report.normalization == "checkpoint"


def test_a_checkpoint_that_is_not_a_vit_fails_with_one_line(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16}))
    with pytest.raises(ConfigError) as err:
        make_config("quickstart", {"init_from": str(bert)})
    assert "model_type='bert'" in str(err.value) and "\n" not in str(err.value)
    # A ViT with another activation: Keras-Hub's ViT would compute GELU on its weights, silently.
    relu = tmp_path / "relu"
    relu.mkdir()
    (relu / "config.json").write_text(
        json.dumps({"model_type": "vit", "hidden_act": "relu", "hidden_size": 16})
    )
    with pytest.raises(
        ConfigError, match="Expected a Hugging Face ViT with hidden_act 'gelu'.*hidden_act='relu'"
    ):
        make_config("quickstart", {"init_from": str(relu)})

    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dense.save(tmp_path / "dense.keras")
    with pytest.raises(ConfigError, match="Expected a ViT of this project"):
        make_config("quickstart", {"init_from": str(tmp_path / "dense.keras")})
    with pytest.raises(ConfigError, match="does not exist"):
        make_config("quickstart", {"init_from": str(tmp_path / "missing.keras")})


def test_an_explicit_hidden_width_that_differs_fails_naming_both_values(hub_preset):
    path, _ = hub_preset
    with pytest.raises(ConfigError) as err:
        make_config(
            "quickstart", {"init_from": str(path), "projection_dim": 64, "transformer_units": "128,64"}
        )
    message = str(err.value)
    assert "projection_dim=64" in message and "projection_dim=16" in message and "\n" not in message
    # Explicit values that agree, and the bridgeable ones, are fine.
    cfg = make_config("quickstart", {"init_from": str(path), "projection_dim": 16, "image_size": 48})
    assert cfg.image_size == 48


# ----------------------------------------------------------------- a model of this project
def test_own_keras_file_copies_the_backbone_and_renews_a_head_of_other_classes(tmp_path):
    from vit_pipeline.model import build_vit

    source_cfg = make_config("quickstart", {"pooling": "class_token"})
    source = build_vit(source_cfg, 7, (32, 32, 3), train_images=splits().x_train)
    randomise(source)
    source.save(tmp_path / "source.keras")
    cfg = make_config(
        "cifar100-improved-light", {"init_from": str(tmp_path / "source.keras"), "image_size": 48}
    )
    assert (cfg.projection_dim, cfg.attention_type, tuple(cfg.mlp_head_units)) == (32, "standard", (128,))
    model, report = finetune.build_model(cfg, splits(3))
    theirs = {w.path: w.numpy() for w in source.weights}
    for path in report.copied:
        mine = next(w for w in model.weights if w.path == path)
        assert np.array_equal(mine.numpy(), theirs[path]), path
    assert "normalization/mean" in report.copied  # the source's input statistics
    assert report.interpolated == ["patch_encoder/position_embedding/embeddings"]
    # 7 classes -> 3: the whole head (its MLP and the logits) is new; the encoder's last norm is kept.
    assert set(report.new) == {
        "head_mlp_dense0/kernel",
        "head_mlp_dense0/bias",
        "logits/kernel",
        "logits/bias",
    }
    assert "head_ln/gamma" in report.copied
    assert report.head == "new"
    # Same classes: the whole head is kept.
    same = Splits(*[getattr(splits(7), f) for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")],
                  [f"c{i}" for i in range(7)])  # fmt: skip
    src = finetune.Source(**{**report.source.__dict__, "class_names": tuple(f"c{i}" for i in range(7))})
    model2, report2 = finetune._from_own(cfg, same, src, keep_head=True)
    assert report2.new == [] and report2.head == "copied"
    np.testing.assert_array_equal(
        model2.get_layer("logits").kernel.numpy(), source.get_layer("logits").kernel.numpy()
    )


# ----------------------------------------------------------------- the recipe's optimizer
def test_layer_depth_orders_embeddings_blocks_and_head():
    from vit_pipeline.optimizer import is_head, layer_depth

    assert layer_depth("patch_encoder/projection/kernel", 4) == 0
    assert layer_depth("normalization/mean", 4) == 0
    assert layer_depth("block0_attention/query/kernel", 4) == 1
    assert layer_depth("block3_mlp_dense1/kernel", 4) == 4
    assert layer_depth("vit_patching_and_embedding/class_token", 4) == 0
    assert layer_depth("vit_encoder/transformer_block_2/mlp/dense_1/kernel", 4) == 2
    assert layer_depth("head_ln/gamma", 4) == 5 and layer_depth("logits/kernel", 4) == 5
    assert is_head("logits/bias") and is_head("head_mlp_dense0/kernel") and is_head("sequential/logits/bias")
    assert not is_head("block0_ln1/gamma") and not is_head("head_ln/gamma")


def _one_step(opt, variables):
    grads = [keras.ops.ones_like(v) for v in variables]
    before = [v.numpy().copy() for v in variables]
    opt.apply_gradients(zip(grads, variables, strict=True))
    return [np.abs(v.numpy() - b).max() for v, b in zip(variables, before, strict=True)]


def test_layer_decay_scales_each_variables_step_and_weight_decay():
    from vit_pipeline.optimizer import ScaledAdamW

    block = keras.Variable(np.ones((2, 2), np.float32), name="block0_kernel")
    head = keras.Variable(np.ones((2, 2), np.float32), name="logits_kernel")
    opt = ScaledAdamW(rate_scales={block.path: 0.25}, learning_rate=0.01, weight_decay=0.0)
    # Adam's first step moves every weight by the rate (m / sqrt(v) = 1): the scale is visible as is.
    step_block, step_head = _one_step(opt, [block, head])
    assert step_head == pytest.approx(0.01, rel=1e-3) and step_block == pytest.approx(0.0025, rel=1e-3)
    b2 = keras.Variable(np.ones(3, np.float32), name="block0_bias")
    h2 = keras.Variable(np.ones(3, np.float32), name="logits_bias")
    decay = ScaledAdamW(rate_scales={b2.path: 0.25}, learning_rate=0.01, weight_decay=10.0)
    zero = [keras.ops.zeros_like(v) for v in (b2, h2)]
    decay.apply_gradients(zip(zero, [b2, h2], strict=True))
    # Keras decays by lr * wd * w; here by lr * scale * wd * w.
    assert 1 - h2.numpy()[0] == pytest.approx(0.01 * 10, rel=1e-4)
    assert 1 - b2.numpy()[0] == pytest.approx(0.0025 * 10, rel=1e-4)


def test_linear_probe_freezes_everything_but_the_head_for_its_steps():
    from vit_pipeline.optimizer import ScaledAdamW

    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="block0_mlp_dense0"),
            keras.layers.Dense(2, name="logits"),
        ]
    )
    opt = ScaledAdamW(frozen_steps=2, learning_rate=0.01)
    v = model.trainable_variables
    body, head = v[0], v[2]
    for step in range(3):
        before_body, before_head = body.numpy().copy(), head.numpy().copy()
        opt.apply_gradients(zip([keras.ops.ones_like(x) for x in v], v, strict=True))
        moved_body = not np.array_equal(body.numpy(), before_body)
        assert not np.array_equal(head.numpy(), before_head)
        assert moved_body == (step >= 2), step
    restored = ScaledAdamW.from_config(opt.get_config())
    assert restored.frozen_steps == 2 and restored.rate_scales == {}


def test_recipe_fields_have_defaults_and_checks():
    cfg = make_config("quickstart")
    assert (cfg.linear_probe_epochs, cfg.layer_decay, cfg.init_from, cfg.backbone, cfg.max_train_minutes) == (
        0, 1.0, None, "vit_pipeline", None,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="linear_probe_epochs < epochs"):
        make_config("quickstart", {"epochs": 2, "linear_probe_epochs": 2})
    with pytest.raises(ConfigError, match="layer_decay"):
        make_config("quickstart", {"layer_decay": 0})
    with pytest.raises(ConfigError, match="attention_type='standard' with backbone='keras_hub'"):
        make_config(
            "quickstart", {"backbone": "keras_hub", "attention_type": "lsa", "pooling": "class_token"}
        )
    tuned = make_config("finetune")
    assert tuned.linear_probe_epochs == 1 and tuned.layer_decay == 0.75 and tuned.label_smoothing == 0.1


def test_compile_uses_the_scaled_optimizer_only_when_the_recipe_asks(hub_preset):
    from vit_pipeline.optimizer import ScaledAdamW
    from vit_pipeline.train import make_optimizer

    path, _ = hub_preset
    cfg = make_config("finetune", {"init_from": str(path), "epochs": 3})
    model, _ = finetune.build_model(cfg, splits())
    opt = make_optimizer(model, cfg, steps_per_epoch=5)
    assert isinstance(opt, ScaledAdamW) and opt.frozen_steps == 5
    scales = opt.rate_scales
    assert scales["logits/kernel"] == 1.0
    embed = next(p for p in scales if "class_token" in p)
    assert scales[embed] == pytest.approx(0.75**3)  # 2 blocks: embeddings at decay^(L+1)
    plain = make_optimizer(model, make_config("quickstart"), 5)
    assert type(plain) is keras.optimizers.AdamW


def test_an_unknown_keras_hub_preset_fails_with_one_line():
    with pytest.raises(ConfigError) as err:
        make_config("quickstart", {"init_from": "vit_no_such_preset"})
    assert "Could not fetch the Keras-Hub preset init_from='vit_no_such_preset'" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_time_budget_stops_training_after_the_epoch_that_spends_it(tmp_path):
    from tests.conftest import TINY
    from vit_pipeline.train import EpochLog, train

    cfg = make_config("quickstart", {**TINY, "epochs": 50, "max_train_minutes": 1e-6})
    result = train(cfg, splits(), tmp_path / "out")
    assert result.epochs_run == 1 and result.time_budget_spent
    record = EpochLog(tmp_path / "out" / "epochs.jsonl").read()[0]
    assert record["epoch_seconds"] > 0
    # Resuming a run that stopped on its budget does not train again.
    again = train(cfg, splits(), tmp_path / "out")
    assert again.train_seconds == 0.0 and again.epochs_run == 1


def test_a_keras_hub_presets_image_converter_sets_the_input_statistics(hub_preset):
    import keras_hub

    path, _ = hub_preset
    keras_hub.layers.ViTImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0).save_to_preset(
        str(path)
    )
    model, report = finetune.build_model(make_config("quickstart", {"init_from": str(path)}), splits())
    norm = model.get_layer("normalization")
    np.testing.assert_allclose(norm.adapt_mean.numpy().ravel(), [127.5] * 3, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(norm.adapt_variance.numpy().ravel()), [127.5] * 3, rtol=1e-6)
    assert report.normalization == "checkpoint"


def test_a_downloaded_checkpoint_leaves_the_disk_with_its_process(tmp_path):
    """Each process that resolved a models:/ or runs:/ checkpoint left a full copy of it in /tmp."""
    import os
    import subprocess
    import sys

    from mlflow import MlflowClient

    from vit_pipeline.mlflow_models import KERAS_ARTIFACT
    from vit_pipeline.model import build_vit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("ckpt", (tmp_path / "artifacts").as_uri()))
    model = build_vit(make_config("quickstart"), 3, (32, 32, 3), train_images=np.zeros((2, 32, 32, 3)))
    model.save(tmp_path / "model.keras")
    client.log_artifact(run.info.run_id, str(tmp_path / "model.keras"), KERAS_ARTIFACT)
    code = (
        "import sys\nfrom vit_pipeline import finetune\n"
        "source = finetune.resolve(sys.argv[1], sys.argv[2])\nprint(source.path)\n"
    )
    # runs:/<id> alone is the run's Keras model (it was an MLflow error about the missing path).
    out = subprocess.run([sys.executable, "-c", code, f"runs:/{run.info.run_id}", uri],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    path = out.stdout.split()[-1]
    assert path.endswith(".keras") and "vit-init-" in path and "/vit-pipeline-" in path
    assert not os.path.exists(path)


def test_a_head_that_does_not_fit_another_grid_is_new_as_a_whole(tmp_path):
    """Flatten pooling over another patch grid: the head's first kernel cannot be copied; its bias and the
    logits were copied onto it, reading features they were never trained on, and the report said 'copied'."""
    from vit_pipeline.model import build_vit

    source = build_vit(make_config("quickstart", {"pooling": "flatten"}), 7, (32, 32, 3),
                       train_images=splits().x_train)  # fmt: skip
    randomise(source)
    source.save(tmp_path / "source.keras")
    cfg = make_config("quickstart", {"init_from": str(tmp_path / "source.keras"), "image_size": 48})
    same = Splits(*[getattr(splits(7), f) for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")],
                  [f"c{i}" for i in range(7)])  # fmt: skip
    src = finetune.resolve(str(tmp_path / "source.keras"))
    src = finetune.Source(**{**src.__dict__, "class_names": tuple(f"c{i}" for i in range(7))})
    model, report = finetune._from_own(cfg, same, src, keep_head=True)
    head = {w.path for w in model.weights if w.path.startswith(("head_mlp_dense", "logits/"))}
    assert report.head == "new" and head and head <= set(report.new)
    assert report.interpolated == ["patch_encoder/position_embedding/embeddings"]


def test_a_resumed_fine_tune_records_the_checkpoint_it_started_from(tmp_path):
    """The checkpoint file rewritten between a crash and the resume: the resumed weights come from the run's
    backup, and the record named the new file's digest (a file the model never started from)."""
    import shutil

    from vit_pipeline.model import build_vit
    from vit_pipeline.train import train

    for seed, name in ((1, "a.keras"), (2, "b.keras")):
        model = build_vit(make_config("quickstart"), 3, (32, 32, 3), train_images=splits().x_train)
        randomise(model, seed)
        model.save(tmp_path / name)
    checkpoint = tmp_path / "checkpoint.keras"
    shutil.copy(tmp_path / "a.keras", checkpoint)
    cfg = make_config("quickstart", {"init_from": str(checkpoint), "epochs": 2, "batch_size": 8})

    class Crash(keras.callbacks.Callback):  # after the first epoch's backup
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("crash")

    told = []  # the stage records it in MLflow from here, before the first epoch (a crash left no record)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, splits(), tmp_path / "run", callbacks=[Crash()], on_init=told.append)
    first = finetune.digest(checkpoint)
    assert [report.source.digest for report in told] == [first]
    shutil.copy(tmp_path / "b.keras", checkpoint)
    finetune._resolve.cache_clear()  # a resume is another process
    assert finetune.digest(checkpoint) != first
    result = train(cfg, splits(), tmp_path / "run")
    assert result.resumed_from_epoch == 1 and result.init["source"]["digest"] == first

    # No whole epoch in the backup (a SIGKILL during the first save left only its temporary file): the
    # weights start again from the checkpoint as it is now, and that is what is recorded.
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, splits(), tmp_path / "again", callbacks=[Crash()])
    backup = tmp_path / "again" / "backup"
    for name in ("latest.weights.h5", "training_metadata.json"):
        (backup / name).unlink()
    (backup / ".latest.weights.h5.0123456789ab.tmp.weights.h5").write_bytes(b"half")
    shutil.copy(tmp_path / "a.keras", checkpoint)
    finetune._resolve.cache_clear()
    result = train(cfg, splits(), tmp_path / "again")
    assert result.resumed_from_epoch == 0 and result.init["source"]["digest"] == first
