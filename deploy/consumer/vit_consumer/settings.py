"""The service's limits and batching (no FastAPI needed to read them).

``Settings`` is a ``pydantic_settings.BaseSettings``: every field is also read
from a ``VIT_<FIELD>`` environment variable (``VIT_MAX_BYTES``, ``VIT_SPIN``,
...), the MLflow tracking URI from ``VIT_TRACKING_URI`` or else
``MLFLOW_TRACKING_URI``. Keyword arguments win over the environment, and a blank
variable counts as unset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vit_consumer import contract
from vit_consumer.classifier import _LEGACY_SPIN, DEFAULT_PIXEL_BUDGET, SPIN_MODES, InputError

DEFAULT_MAX_BYTES = 8 * 2**20
ENV_PREFIX = "VIT_"


class SettingsError(InputError):
    """A setting's value is invalid; the message is one line naming the variable and the value.

    An ``InputError``, so the command line reports it as one line too, as it does
    its other bad inputs.
    """


class Settings(BaseSettings):
    """Limits and batching of the service: each field a ``VIT_<FIELD>`` variable, most a ``serve`` option.

    ``max_batch_size`` 32: on the 2-core machine of deploy/consumer/README.md the
    seed graph's throughput grows little past batch 32 (that table), while
    latency grows with it.

    Raises:
        SettingsError: A value, passed or read from the environment, is invalid.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        # `Settings(tracking_uri=...)` in code, although the variables it is read from are aliases.
        populate_by_name=True,
        # `VIT_PROVIDERS=` (compose files, `env -u` being awkward) means unset, not an invalid value.
        env_ignore_empty=True,
        # `inf` (or `1e999`) passes `gt=0` and would mean "never": a stalled upload held its place for ever.
        allow_inf_nan=False,
    )

    max_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0)
    """Largest request body in bytes (beyond: 413)."""
    max_inflight_bytes: int = Field(128 * 2**20, gt=0)
    """Bytes of all request bodies being handled at once (beyond: 503 with Retry-After)."""
    max_batch_size: int = Field(32, gt=0, le=contract.MAX_BATCH_SIZE)
    """Most images per ``session.run``, and per ``/v2`` infer request (beyond: 400, as Triton)."""
    max_queue_delay_ms: float = Field(2.0, ge=0)
    """Longest a batch waits for requests already on their way (being decoded), in ms; with none, it runs at once."""
    max_queue: int = Field(256, gt=0)
    """Requests waiting for the engine (beyond: 503 with Retry-After)."""
    timeout_s: float = Field(10.0, gt=0)
    """Seconds a request may take once its body has arrived (then 504)."""
    body_timeout_s: float = Field(30.0, gt=0)
    """Seconds a client may take to send its body (then 408): a stalled upload does not hold its place."""
    pixel_budget: int = Field(DEFAULT_PIXEL_BUDGET, gt=0)
    """Decoded pixels of all images of one request together (beyond: 413)."""
    max_json_depth: int = Field(8, gt=0)
    """Deepest nesting of a JSON body (beyond: 400)."""
    max_json_numbers: int = Field(1_048_576, gt=0)
    """Most values in a JSON body (beyond: 413)."""
    decode_threads: int = Field(2, gt=0, le=256)  # each a thread and its buffers: 100000 was accepted
    """Threads that read and decode request bodies."""
    # ONNX Runtime's threads spin while a run is in progress, never between runs: those
    # cycles belong to HTTP and decoding (vit_consumer.classifier.spin_options).
    spin: str = "run"
    """When ONNX Runtime's threads spin: never, run (only during a run) or always; legacy yes/no values too."""
    reload_seconds: float = Field(0.0, ge=0)
    """How often to check a ``models:/name@alias`` source and switch to a new version (0: never)."""
    tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("VIT_TRACKING_URI", "MLFLOW_TRACKING_URI")
    )
    """MLflow tracking URI for ``models:/`` sources: ``VIT_TRACKING_URI``, else ``MLFLOW_TRACKING_URI``."""
    # NoDecode: the variable is a comma-separated list, not the JSON pydantic-settings expects by default.
    providers: Annotated[tuple[str, ...] | None, NoDecode] = None
    """ONNX Runtime execution providers to request, in order (None: the classifier's default)."""
    allow_contract_change: bool = False
    """Switch to a new version whose class names (or their order) or input shape differ from the served one's
    (False: keep serving, and say why in /health: clients may hold the old class list or shape)."""
    choose_candidate: bool = True
    """Time the registered serving candidates at start-up and serve the fastest (vit_consumer.candidates)."""
    engine: str = "auto"
    """Inference engine: auto (the fastest that passes the gate here: ONNX Runtime, and OpenVINO where installed),
    onnxruntime, openvino (its default precision: bf16 on AMX/AVX512-BF16) or openvino-f32."""

    ov_streams: int = Field(0, ge=0)
    """OpenVINO's streams: requests run at once, each on its share of the cores. 0: OpenVINO's throughput
    choice for this CPU; 1: one request at a time on every core (the fastest lone request)."""

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, value: Any) -> Any:
        from vit_consumer.engines import parse_spec

        if isinstance(value, str) and value.strip().lower() != "auto":
            try:
                parse_spec(value)
            except ValueError:
                raise PydanticCustomError(
                    "engine", "expected auto, onnxruntime, openvino or openvino-f32"
                ) from None
        return value.strip().lower() if isinstance(value, str) else value

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # pydantic's report is a page per error; a service that will not start needs one line.
            raise SettingsError(_one_line(exc, values)) from None

    @field_validator("spin", mode="before")
    @classmethod
    def _spin_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
        if isinstance(value, (str, bool)):
            value = _LEGACY_SPIN.get(value, value)
        if value not in SPIN_MODES:
            raise PydanticCustomError(
                "spin_mode",
                "expected one of {modes}, or a legacy yes/no value (1/0, true/false, yes/no, on/off)",
                {"modes": ", ".join(SPIN_MODES)},
            )
        return value

    @field_validator("providers", mode="before")
    @classmethod
    def _provider_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, (list, tuple)) and not value:
            return None  # no names: the classifier's default, as when unset
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # A name ONNX Runtime does not know (a typo) was dropped with a warning and the model served on CPU.
        # A known one this machine cannot run (CUDA on a CPU node) still falls back: one image fits both.
        if value and (unknown := contract.unknown_providers(value)):
            raise PydanticCustomError(
                "unknown_provider",
                "unknown ONNX Runtime provider(s) {unknown}; expected names from onnxruntime.get_all_providers(), "
                "such as {cpu} or {cuda}",
                {"unknown": ", ".join(unknown), "cpu": contract.CPU, "cuda": contract.CUDA},
            )
        return value

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _blank_uri(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def choose_for(self) -> tuple[int, ...] | None:
        """Batch sizes the candidates are timed at: a lone request and a full batch."""
        return (1, self.max_batch_size) if self.choose_candidate else None


def _one_line(exc: ValidationError, passed: Mapping[str, Any]) -> str:
    """Each error of ``exc`` as ``WHERE=VALUE: problem``, WHERE the keyword or the variable it came from."""
    fields = {
        alias: name
        for name, info in Settings.model_fields.items()
        for alias in (name, *getattr(info.validation_alias, "choices", ()))
    }
    problems = []
    for error in exc.errors(include_url=False):
        key = str(error["loc"][0]) if error["loc"] else "?"
        name = fields.get(key)
        if name is None:
            problems.append(f"unknown setting {key!r}")
            continue
        if name in passed or key in passed:
            where = name
        else:  # from the environment: name the variable itself
            where = key if key != name else f"{ENV_PREFIX}{name.upper()}"
        value = repr(error.get("input"))
        value = value if len(value) <= 80 else value[:77] + "..."
        field = "" if where == name else f" (Settings.{name})"
        problems.append(f"{where}={value}{field}: {error['msg']}")
    return "Invalid settings: " + "; ".join(problems)


def settings_table() -> str:
    """The variables as a Markdown table (variable, default, meaning), as deploy/consumer/README.md shows them."""
    rows = []
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = getattr(alias, "choices", None) or [f"VIT_{name.upper()}"]
        meaning = " ".join((info.description or "").split())
        rows.append(f"| {' or '.join(f'`{n}`' for n in names)} | `{info.default!r}` | {meaning} |")
    return "\n".join(rows)
