"""The consumer's settings from the environment (vit_consumer.settings): no server, no TensorFlow."""

from __future__ import annotations

import pytest
from vit_consumer.server import settings_from_env
from vit_consumer.settings import Settings

FIELDS = ("max_bytes", "max_inflight_bytes", "max_batch_size", "max_queue_delay_ms", "max_queue", "timeout_s",
          "body_timeout_s", "pixel_budget", "max_json_depth", "max_json_numbers", "decode_threads", "spin", "reload_seconds",
          "tracking_uri", "providers", "allow_contract_change", "choose_candidate", "engine", "ov_streams")  # fmt: skip
TWO_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"

# (variables, field, parsed value): the value's type is checked as well as its value.
CASES = [
    ({"VIT_MAX_BYTES": "1024"}, "max_bytes", 1024),
    ({"VIT_MAX_INFLIGHT_BYTES": "4096"}, "max_inflight_bytes", 4096),
    ({"VIT_MAX_BATCH_SIZE": "8"}, "max_batch_size", 8),
    ({"VIT_MAX_QUEUE_DELAY_MS": "0.5"}, "max_queue_delay_ms", 0.5),
    ({"VIT_MAX_QUEUE": "4"}, "max_queue", 4),
    ({"VIT_TIMEOUT_S": "2.5"}, "timeout_s", 2.5),
    ({"VIT_BODY_TIMEOUT_S": "4"}, "body_timeout_s", 4.0),
    ({"VIT_PIXEL_BUDGET": "1000000"}, "pixel_budget", 1_000_000),
    ({"VIT_MAX_JSON_DEPTH": "3"}, "max_json_depth", 3),
    ({"VIT_MAX_JSON_NUMBERS": "100"}, "max_json_numbers", 100),
    ({"VIT_DECODE_THREADS": "4"}, "decode_threads", 4),
    *[({"VIT_SPIN": mode}, "spin", mode) for mode in ("never", "run", "always")],
    ({"VIT_SPIN": " Always "}, "spin", "always"),
    # Before the modes, VIT_SPIN was yes/no: yes spun always, no never.
    *[({"VIT_SPIN": raw}, "spin", "always") for raw in ("1", "true", "yes", "on")],
    *[({"VIT_SPIN": raw}, "spin", "never") for raw in ("0", "false", "no", "off")],
    ({"VIT_RELOAD_SECONDS": "30"}, "reload_seconds", 30.0),
    ({"VIT_TRACKING_URI": "http://vit:5000"}, "tracking_uri", "http://vit:5000"),
    ({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, "tracking_uri", "http://mlflow:5000"),
    (
        {"VIT_TRACKING_URI": "http://vit:5000", "MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        "tracking_uri",
        "http://vit:5000",
    ),  # fmt: skip
    ({"VIT_PROVIDERS": TWO_PROVIDERS}, "providers", ("CUDAExecutionProvider", "CPUExecutionProvider")),
    ({"VIT_PROVIDERS": " CPUExecutionProvider , "}, "providers", ("CPUExecutionProvider",)),
    ({"VIT_PROVIDERS": ""}, "providers", None),
    ({"VIT_ALLOW_CONTRACT_CHANGE": "true"}, "allow_contract_change", True),
    ({"VIT_CHOOSE_CANDIDATE": "false"}, "choose_candidate", False),
    ({"VIT_CHOOSE_CANDIDATE": "0"}, "choose_candidate", False),
    ({"VIT_CHOOSE_CANDIDATE": "true"}, "choose_candidate", True),
    ({"VIT_ENGINE": "OpenVINO"}, "engine", "openvino"),
    ({"VIT_ENGINE": "openvino-f32"}, "engine", "openvino-f32"),
    ({"VIT_ENGINE": "onnxruntime"}, "engine", "onnxruntime"),
    ({"VIT_OV_STREAMS": "1"}, "ov_streams", 1),
    ({"VIT_OV_STREAMS": "4"}, "ov_streams", 4),
]

READERS = {"Settings()": lambda: Settings(), "settings_from_env()": lambda: settings_from_env()}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No setting comes from the environment the tests run in."""
    for name in FIELDS:
        monkeypatch.delenv(f"VIT_{name.upper()}", raising=False)
    for name in ("MLFLOW_TRACKING_URI", "VIT_MODEL_URI", "VIT_CONSUMER_PROVIDERS"):
        monkeypatch.delenv(name, raising=False)
    yield
    # Gone before tests/conftest.py checks that no test leaves MLflow's store set (monkeypatch itself
    # undoes only after that check); undoing in reverse order still restores the original.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_every_field_has_a_case():
    assert set(vars(Settings())) == set(FIELDS)
    assert {field for _, field, _ in CASES} == set(FIELDS)


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
@pytest.mark.parametrize(("env", "field", "expected"), CASES, ids=lambda v: "+".join(f"{k}={v[k]}" for k in v)
                         if isinstance(v, dict) else None)  # fmt: skip
def test_each_variable_is_read_and_typed(monkeypatch, read, env, field, expected):
    defaults = vars(Settings())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = read()
    value = getattr(settings, field)
    assert type(value) is type(expected) and value == expected
    if field == "choose_candidate":
        assert settings.choose_for == ((1, settings.max_batch_size) if expected else None)
    # The variable sets its field and no other.
    assert {k: v for k, v in vars(settings).items() if k != field} == {
        k: v for k, v in defaults.items() if k != field
    }


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("VIT_MAX_BATCH_SIZE", "eight"),  # int
        ("VIT_MAX_QUEUE", "0"),  # int, out of range
        ("VIT_TIMEOUT_S", "fast"),  # float
        ("VIT_CHOOSE_CANDIDATE", "maybe"),  # bool
        ("VIT_SPIN", "sometimes"),  # spin
        ("VIT_ENGINE", "tensorrt"),  # engine
        ("VIT_OV_STREAMS", "-1"),  # int, out of range
        ("VIT_BODY_TIMEOUT_S", "inf"),  # float, not finite: no limit at all
        ("VIT_TIMEOUT_S", "1e999"),  # float, overflows to inf
        ("VIT_MAX_BATCH_SIZE", "100000000"),  # a 1 TiB input buffer at start-up: a traceback
        ("VIT_DECODE_THREADS", "100000"),  # a hundred thousand threads
        ("VIT_PROVIDERS", "CPUExecutionProvider,CUDAExecutionProvder"),  # a typo: dropped, served on CPU
    ],
)
def test_an_invalid_value_is_one_line_naming_the_variable_and_the_value(monkeypatch, variable, raw):
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ValueError) as caught:
        settings_from_env()
    message = str(caught.value)
    assert "\n" not in message and variable in message and repr(raw) in message
    assert variable.removeprefix("VIT_").lower() in message  # the field too


def test_an_invalid_keyword_names_the_keyword():
    with pytest.raises(
        ValueError, match=r"^Invalid settings: spin='sometimes': expected one of never, run, always"
    ):
        Settings(spin="sometimes")
    with pytest.raises(ValueError, match="unknown setting 'max_byte'"):
        Settings(max_byte=5)  # extra fields are forbidden: a typo is not silently ignored


def test_keywords_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("VIT_MAX_BYTES", "5")
    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("VIT_TRACKING_URI", "http://vit:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("VIT_PROVIDERS", TWO_PROVIDERS)
    settings = Settings(max_bytes=7, tracking_uri="http://kw:5000", providers=("CPUExecutionProvider",))
    assert (settings.max_bytes, settings.tracking_uri, settings.providers) == (
        7, "http://kw:5000", ("CPUExecutionProvider",))  # fmt: skip
    assert settings.max_batch_size == 3  # a field the caller did not pass comes from the environment
    assert settings_from_env(max_bytes=9, tracking_uri=None).max_bytes == 9
    assert settings_from_env(tracking_uri=None).tracking_uri is None


def test_settings_are_frozen_and_every_field_is_documented():
    settings = Settings()
    with pytest.raises(ValueError):
        settings.max_bytes = 1
    assert all(info.description for info in Settings.model_fields.values())


@pytest.fixture
def model_env(monkeypatch, tmp_path):
    """VIT_MODEL_URI naming a tiny ONNX classifier (no TensorFlow), loaded on the CPU without timing."""
    from tests.conftest import constant_classifier

    monkeypatch.setenv("VIT_MODEL_URI", str(constant_classifier(tmp_path / "model.onnx", 3, favoured=1)))
    monkeypatch.setenv("VIT_CHOOSE_CANDIDATE", "false")


def _service_from_env():
    from vit_consumer.server import app_from_env

    service = app_from_env().state.service
    service.decode_pool.shutdown()  # never started: nothing to wait for
    return service


@pytest.mark.parametrize("mlflow_too", [False, True], ids=["VIT_TRACKING_URI", "both"])
def test_app_from_env_takes_the_vit_tracking_uri_without_a_type_error(monkeypatch, model_env, mlflow_too):
    monkeypatch.setenv("VIT_TRACKING_URI", "http://vit:5000")
    if mlflow_too:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "4")
    settings = _service_from_env().settings
    assert (settings.tracking_uri, settings.max_batch_size, settings.choose_for) == (
        "http://vit:5000",
        4,
        None,
    )


def test_app_from_env_falls_back_to_mlflow_tracking_uri(monkeypatch, model_env):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert _service_from_env().settings.tracking_uri == "http://mlflow:5000"


def test_app_from_env_loads_the_model_with_vit_providers(monkeypatch, model_env):
    monkeypatch.setenv("VIT_PROVIDERS", "CPUExecutionProvider")
    service = _service_from_env()
    assert service.settings.providers == ("CPUExecutionProvider",)
    assert service.engine.providers_requested == ["CPUExecutionProvider"]


def test_app_from_env_without_a_model_is_one_clear_error(monkeypatch):
    from vit_consumer.server import app_from_env

    with pytest.raises(ValueError, match=r"^VIT_MODEL_URI is not set") as caught:
        app_from_env()
    assert "\n" not in str(caught.value)


def test_the_readme_table_is_the_settings_class():
    from pathlib import Path

    from vit_consumer.settings import settings_table

    readme = (Path(__file__).parents[2] / "deploy" / "consumer" / "README.md").read_text()
    assert settings_table() in readme, "regenerate the table with vit_consumer.settings.settings_table()"


def test_an_empty_or_ambiguous_model_path_is_refused_not_guessed(tmp_path, monkeypatch):
    """``--model ''`` was the working directory: the first .onnx file anywhere under it was served."""
    from vit_consumer.classifier import InputError, resolve_model

    nested = tmp_path / "someone" / "else"
    nested.mkdir(parents=True)
    (nested / "their.onnx").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(InputError, match="Expected a model: a .onnx file"):
            resolve_model(empty)
    assert resolve_model(str(tmp_path)) == nested / "their.onnx"  # one file under a named folder: that one
    (tmp_path / "b.onnx").write_bytes(b"x")
    (tmp_path / "a.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match=r"2 \.onnx files under .* and no model\.onnx \(a\.onnx, b\.onnx\)"):
        resolve_model(str(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert resolve_model(str(tmp_path)) == tmp_path / "model.onnx"


def test_the_consumer_cli_refuses_a_top_k_or_host_it_would_not_serve(capsys):
    """--top-k 0 or -1 answered one class; --host "" listened on every interface."""
    from vit_consumer.__main__ import _parser

    cases = [
        (["predict", "a.png", "--top-k", k], "expected a whole number from 1 to 1000")
        for k in ("0", "-1", "x", "1001")
    ]
    cases += [(["serve", "--host", host], "expected a host such as 127.0.0.1") for host in ("", " ")]
    for args, says in cases:
        with pytest.raises(SystemExit) as caught:
            _parser().parse_args(["--model", "m.onnx", *args])
        assert caught.value.code == 2 and says in capsys.readouterr().err, args
    assert _parser().parse_args(["--model", "m.onnx", "predict", "a.png", "--top-k", "1000"]).top_k == 1000


def test_a_registry_uri_without_a_store_creates_none(tmp_path, monkeypatch):
    """``models:/x@champion`` with no tracking URI read MLflow's default, ./mlflow.db, and created it."""
    from vit_consumer.classifier import InputError, alias_version, resolve_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for call in (lambda: resolve_model("models:/x@champion"), lambda: alias_version("models:/x@champion")):
        with pytest.raises(InputError, match=r"no MLflow store at sqlite:///.*mlflow\.db \(no such file\)"):
            call()
    with pytest.raises(InputError, match="no such file"):
        resolve_model("models:/x/1", f"sqlite:///{tmp_path / 'elsewhere' / 'm.db'}")
    assert list(tmp_path.iterdir()) == []
