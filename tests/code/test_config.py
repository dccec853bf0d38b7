import pytest
from click.testing import CliRunner

from vit_pipeline.cli import main
from vit_pipeline.config import PRESETS, PipelineConfig, coerce, make_config
from vit_pipeline.errors import ConfigError


def test_cifar100_preset_is_the_seed_recipe():
    cfg = make_config("cifar100")
    assert (cfg.dataset, cfg.image_size, cfg.patch_size, cfg.projection_dim) == ("cifar100", 72, 6, 64)
    assert (cfg.num_heads, cfg.transformer_layers) == (4, 8)
    assert cfg.mlp_head_units == (2048, 1024)
    assert cfg.transformer_units == (128, 64)
    assert (cfg.learning_rate, cfg.batch_size, cfg.epochs, cfg.validation_split) == (1e-3, 256, 100, 0.1)
    # tfa's wd=1e-4 (w -= wd*w) equals Keras' weight_decay = wd / lr (w -= lr*wd*w).
    assert cfg.weight_decay * cfg.learning_rate == pytest.approx(1e-4)
    assert cfg.num_patches == 144


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_validates(preset):
    assert isinstance(make_config(preset), PipelineConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"patch_size": 7},
            "Expected patch_size to divide image_size. Received: patch_size=7, image_size=72",
        ),
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"validation_split": 0.0}, "validation_split=0.0"),
        ({"validation_split": 1.0}, "validation_split=1.0"),
        ({"dataset": "mnist"}, "dataset='mnist'"),
        ({"dataset": "image_folder"}, "data_path=None"),
        ({"label_mode": "medium"}, "label_mode='medium'"),
        ({"epochs": "ten"}, "epochs='ten'"),
        ({"epochs": 2.5}, "epochs=2.5"),
        ({"transformer_units": "128,32"}, "transformer_units=[128, 32]"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"head_dropout": 1.0}, "head_dropout=1.0"),
    ],
)
def test_invalid_values_name_field_and_value(overrides, message):
    base = "cifar100"
    with pytest.raises(ConfigError) as err:
        make_config(base, overrides)
    assert message in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset='nope'"):
        make_config("nope")


def test_strings_from_the_cli_are_parsed():
    assert coerce("mlp_head_units", "2048, 1024") == (2048, 1024)
    assert coerce("mlp_head_units", [512]) == (512,)
    assert coerce("learning_rate", "3e-4") == 3e-4
    assert coerce("data_path", "none") is None
    assert coerce("epochs", "7") == 7


def test_config_round_trips_through_dict():
    from vit_pipeline.config import from_dict

    cfg = make_config("quickstart", {"epochs": 3})
    assert from_dict(cfg.to_dict()) == cfg


def test_cli_config_prints_overrides():
    result = CliRunner().invoke(
        main, ["config", "--preset", "cifar100", "--epochs", "3", "--mlp-head-units", "64"]
    )
    assert result.exit_code == 0, result.output
    assert '"epochs": 3' in result.output and '"mlp_head_units": [\n    64\n  ]' in result.output


def test_cli_rejects_bad_value_in_one_line_without_traceback():
    result = CliRunner().invoke(main, ["config", "--preset", "cifar100", "--patch-size", "7"])
    assert result.exit_code == 2
    assert "Expected patch_size to divide image_size" in result.output
    assert "Traceback" not in result.output


def test_cli_run_rejects_bad_config_before_any_work(pipeline_home):
    result = CliRunner().invoke(main, ["run", "--validation-split", "2"])
    assert result.exit_code == 2
    assert "validation_split=2.0" in result.output
    assert not (pipeline_home / "mlflow.db").exists()
