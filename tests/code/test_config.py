import json
import unicodedata

import pytest
from click.testing import CliRunner

from vit_pipeline.cli import main
from vit_pipeline.config import PRESETS, ConfigOverrides, PipelineConfig, coerce, field_names, make_config
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
        ({"seed": -5}, "Expected seed >= 0. Received: seed=-5"),
        ({"seed": 2**32}, "seed=4294967296"),
        ({"parity_tolerance": float("inf")}, "parity_tolerance: Input should be a finite number"),
        ({"learning_rate": float("nan")}, "learning_rate: Input should be a finite number"),
        ({"tracking_wait_seconds": float("inf")}, "tracking_wait_seconds: Input should be a finite number"),
        ({"registered_model_name": "a/b@c"}, "without '/', ':', '%'"),
        ({"registered_model_name": "vit@pets"}, "or '@'"),  # models:/vit@pets@champion names nothing
        # Not read by that dataset: was silently ignored.
        ({"dataset": "digits", "data_path": "c.tar.gz"}, "Expected no data_path for dataset='digits'"),
        (
            {"dataset": "image_folder", "data_path": "d", "label_mode": "coarse"},
            "Received: label_mode='coarse'",
        ),
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


def test_a_home_that_is_a_file_and_a_malformed_tracking_uri_are_one_line(tmp_path, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("")
    monkeypatch.setenv("VIT_PIPELINE_HOME", str(home))
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        result.output.startswith(f"Error: cannot write under VIT_PIPELINE_HOME={home}")
        and "Not a directory" in result.output
    )
    monkeypatch.setenv("VIT_PIPELINE_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["runs", "--tracking-uri", "htp:/::bad"])
    lines = result.output.splitlines()
    assert result.exit_code == 1 and len(lines) == 2 and "unsupported URI 'htp:/::bad'" in lines[0], (
        result.output
    )
    assert lines[1].startswith("(details: ")


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


def test_every_field_has_a_type_a_description_and_a_schema():
    schema = ConfigOverrides.model_json_schema()
    assert schema["additionalProperties"] is False and list(schema["properties"]) == field_names()
    for name, prop in schema["properties"].items():
        assert prop["default"] is None and len(prop["description"]) > 30, name
        assert {"type": "null"} in prop["anyOf"] and len(prop["anyOf"]) == 2, name
    assert {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1} in schema["properties"][
        "validation_split"
    ]["anyOf"]
    assert "seed 72 (cifar100-improved: 32" in schema["properties"]["image_size"]["description"]


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"epochs": 2.5}, {"dataset": "mnist"}, {"validation_split": 1.0}, {"no_such_field": 1},
     {"serve_candidates": "int8,fp64"}, {"benchmark_variants": ""}, {"mlp_head_units": [0]},
     {"dataset_name": "a b"}, {"onnx_opset": 19}, {"seed": -1}, {"registered_model_name": "a:b"}],
)  # fmt: skip
def test_the_json_schema_refuses_what_the_model_refuses(bad):
    """What the Prefect server checks at run creation (the JSON schema) agrees with the model."""
    import jsonschema

    schema = ConfigOverrides.model_json_schema()
    jsonschema.validate(json.loads(make_config("cifar100").to_json()), schema)
    with pytest.raises(ConfigError):
        make_config("cifar100", config=bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_typed_config_wins_over_untyped_overrides():
    cfg = make_config("quickstart", {"epochs": 3, "seed": 1}, ConfigOverrides(epochs=5))
    assert (cfg.epochs, cfg.seed, cfg.batch_size) == (5, 1, PRESETS["quickstart"]["batch_size"])
    assert make_config("quickstart", config={"epochs": None}).epochs == PRESETS["quickstart"]["epochs"]


def test_cli_help_describes_every_field():
    result = CliRunner().invoke(main, ["config", "--help"], terminal_width=200)
    assert (
        "--validation-split FLOAT" in result.output
        and "Fraction of the training images held out" in result.output
    )
    assert (
        "--label-mode [fine|coarse]" in result.output and "--max-train-images INTEGER|none" in result.output
    )
    assert all(f"--{name.replace('_', '-')}" in result.output for name in field_names())


def test_presets_are_data_files_and_extends_resolves(tmp_path):
    from vit_pipeline.config import PRESETS_DIR, _load_presets
    from vit_pipeline.errors import ConfigError

    assert sorted(PRESETS) == sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    light, full = PRESETS["cifar100-improved-light"], PRESETS["cifar100-improved"]
    assert (
        light["projection_dim"] == full["projection_dim"]
        and light["mixup_alpha"] == 0.0 < full["mixup_alpha"]
    )
    (tmp_path / "a.yaml").write_text("values: {epochs: 3}\n")
    (tmp_path / "b.yaml").write_text("extends: a\nvalues: {seed: 7}\n")
    assert _load_presets(tmp_path) == {"a": {"epochs": 3}, "b": {"epochs": 3, "seed": 7}}
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ConfigError, match="extends 'nowhere', which is unknown"):
        _load_presets(tmp_path)
    (tmp_path / "c.yaml").write_text("value: {}\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['value'\]"):
        _load_presets(tmp_path)


def test_config_sections_and_flat_names():
    from vit_pipeline.config import SECTIONS, field_names

    cfg = make_config("quickstart", {"epochs": 3, "tracking_uri": "sqlite:///x.db"})
    assert cfg.optimizer.epochs == cfg.epochs == 3 and cfg.tracking.tracking_uri == "sqlite:///x.db"
    assert cfg.model.patch_size == 4 and cfg.data.dataset == "digits"
    names = [n for section in SECTIONS.values() for n in section.model_fields]
    assert len(names) == len(set(names)) == len(field_names())  # a flat name is one field
    assert list(cfg.to_dict()) == field_names()
    # The tracking section holds where a run is recorded, nothing of the model or its training.
    assert set(SECTIONS["tracking"].model_fields) == {"experiment_name", "tracking_uri", "run_name",
                                                     "tracking_wait_seconds", "system_metrics_seconds"}  # fmt: skip
    nested = PipelineConfig(optimizer={"epochs": 3}, tracking={"tracking_uri": "sqlite:///x.db"})
    assert nested.epochs == 3 and nested == PipelineConfig(epochs=3, tracking_uri="sqlite:///x.db")
    with pytest.raises(AttributeError):
        _ = cfg.no_such_field


def test_an_image_folder_is_named_by_the_folder_it_is(tmp_path, monkeypatch):
    """ ".", ".." and a name of other letters were all "images": one schema, one experiment and one registered
    model for unrelated datasets (the second failed data validation, "class list changed")."""
    from vit_pipeline.config import folder_dataset_name

    (tmp_path / "pets" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "pets")
    assert (
        folder_dataset_name(".") == folder_dataset_name("./train") == folder_dataset_name("../pets") == "pets"
    )
    assert folder_dataset_name("/data/flowers/train") == "flowers"
    photos, pictures = folder_dataset_name("/data/写真"), folder_dataset_name("/data/图片")
    assert photos.startswith("images-") and pictures.startswith("images-") and photos != pictures
    assert folder_dataset_name("/data/写真/train") == photos
    for name in ("caf\u00e9", "写真データ"):  # as macOS writes names (decomposed): the same dataset
        assert folder_dataset_name(f"/d/{unicodedata.normalize('NFD', name)}") == folder_dataset_name(
            f"/d/{name}"
        )


def test_an_integer_list_may_end_with_a_comma_but_leaves_no_number_out():
    from vit_pipeline.config import parse_int_list

    assert parse_int_list("(512,)") == (512,) and parse_int_list("2048, 1024,") == (2048, 1024)
    with pytest.raises(ValueError, match="an empty item"):
        parse_int_list("1,,64")  # read as [1, 64]


def test_values_no_stage_could_use_are_refused_before_anything_runs(tmp_path):
    """nan and inf passed click's ranges (``benchmark --seconds inf`` ran for ever); a 9-digit benchmark batch
    was accepted by the config and failed after the training, allocating 286 GiB; an unknown provider measured
    nothing and exited 0; a blank --resume started a fresh run."""
    from click.testing import CliRunner

    from vit_pipeline.cli import main

    cases = [
        (["benchmark", "--preset", "quickstart", "--seconds", "inf"], "is not a finite number"),
        (["benchmark", "--preset", "quickstart", "--seconds", "nan"], "is not a finite number"),
        (["train", "--resume", ""], "expected an MLflow run id"),  # an empty shell variable: a fresh run
        (["run", "--resume", " "], "expected an MLflow run id"),
        (["config", "--benchmark-batch-sizes", "99999999"], "benchmark_batch_sizes"),
        (
            [
                "benchmark",
                "--preset",
                "quickstart",
                "--providers",
                "bogus",
                "--output",
                str(tmp_path / "b" / "r.json"),
            ],
            "Received: bogus",
        ),  # measured nothing and exited 0 with an empty table
    ]
    for args, says in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and says in result.output, (args, result.output[-1500:])
        assert "Traceback" not in result.output
    assert CliRunner().invoke(main, ["config", "--benchmark-batch-sizes", "1,4096"]).exit_code == 0
    assert not (tmp_path / "b").exists()
