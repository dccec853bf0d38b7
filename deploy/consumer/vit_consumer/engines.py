"""Inference engines behind one small interface, each reading the same ONNX file.

* ``onnxruntime``: an ONNX Runtime session (the consumer's only required engine).
* ``openvino``: OpenVINO's CPU plugin compiling the ONNX file directly (optional:
  ``pip install vit-consumer[openvino]``). With ``precision="default"`` the plugin
  chooses how it computes: bf16 where the CPU has AMX or AVX512-BF16, f32
  elsewhere; ``precision="f32"`` forces f32 (``INFERENCE_PRECISION_HINT``).

Which engine is fastest depends on the CPU (OpenVINO's bf16 on AMX, ONNX
Runtime's fused fp32 graph and int8 kernels elsewhere), so the service times the
ones that pass their agreement gate on the machine that serves
(``vit_consumer.candidates``). ``precision`` is what the compiled model really
computes in, read back from the engine, never the one requested.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from vit_consumer import contract

log = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
ENGINES = (ONNXRUNTIME, OPENVINO)
OV_PRECISIONS = ("default", "f32")
LATENCY = {"PERFORMANCE_HINT": "LATENCY"}  # one request at a time, every core on it
# OpenVINO's element type names -> the names the benchmark and /health use.
PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8"}


class EngineError(ValueError):
    """An engine cannot load a file here (not installed, not a model it reads)."""


class Engine(Protocol):
    """What the classifier needs from an engine."""

    name: str  # ONNXRUNTIME or OPENVINO
    precision: str  # what the compiled model computes in: fp32, bf16, ...
    requested_precision: str  # "default" or "f32": the setting, not the outcome
    providers_used: list[str]  # what really runs (ONNX Runtime providers, OpenVINO's device)
    parallel: int  # requests it runs at once, each on its share of the cores (OpenVINO streams); else 1
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]  # (H, W, C), without the batch (-1: not fixed; contract.io_problem says so)
    # The shapes of every input and output (None: a dynamic size), for contract.io_problem.
    io: tuple[list, list]
    dtypes: tuple[str, str]  # the numpy names of the input's and the first output's element types
    metadata: dict[str, str]  # the file's metadata_props

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits of a float32 NHWC batch."""

    def run_alone(self, images: np.ndarray) -> np.ndarray:
        """``run`` for a batch that has the machine to itself (no other batch runs): every core on it."""


def spec_label(engine: str, precision: str = "default") -> str:
    """``onnxruntime``, ``openvino`` or ``openvino-f32``: how a person names an engine setting."""
    return engine if engine == ONNXRUNTIME or precision == "default" else f"{engine}-{precision}"


def parse_spec(label: str) -> tuple[str, str]:
    """``openvino-f32`` -> ``("openvino", "f32")``; a one-line ValueError for anything else."""
    engine, _, precision = label.strip().lower().partition("-")
    precision = precision or "default"
    if (
        engine not in ENGINES
        or (engine == ONNXRUNTIME and precision != "default")
        or precision not in OV_PRECISIONS
    ):
        choices = ", ".join([ONNXRUNTIME, OPENVINO, f"{OPENVINO}-f32"])
        raise ValueError(f"Expected an engine among {choices}. Received: engine={label!r}")
    return engine, precision


def openvino_available() -> tuple[bool, str]:
    """(importable, its version or why not)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return False, f"openvino is not installed ({exc}); pip install 'vit-consumer[openvino]'"
    return True, ov.get_version()


def cpu_budget(
    cgroup: str | os.PathLike = "/sys/fs/cgroup", membership: str | os.PathLike = "/proc/self/cgroup"
) -> int | None:
    """The cores a CPU quota allows this process (a container's ``--cpus``, a pod's CPU limit, a systemd
    ``CPUQuota``), where it is fewer than the cores it may run on; else None.

    Why: ONNX Runtime and OpenVINO size their thread pools (and OpenVINO its streams) by the cores they see,
    and a quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) hides none of them: on a 64-core node a pod
    limited to 2 CPUs would run dozens of threads in the time of two, throttled (OpenVINO issue #37838).
    The process's own cgroup (``membership``) is read first, then the hierarchy's root (what a container
    with its own cgroup namespace sees as its own).
    """
    quota_period = _cgroup_quota(Path(cgroup), Path(membership))
    if quota_period is None:
        return None
    quota, period = quota_period
    allowed = max(1, -(-quota // period))  # a quota of 1.5 CPUs keeps 2 threads busy
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return allowed if allowed < visible else None


def _cgroup_quota(root: Path, membership: Path) -> tuple[int, int] | None:
    """(quota, period) in microseconds of the first cgroup of this process that sets one; None: no quota."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    places: list[tuple[Path, tuple[str, str]]] = []  # (folder, (quota file, period file)); "" = one cpu.max
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.lstrip("/")
        if controllers == "":  # cgroup v2
            places += [(root / relative, ("cpu.max", "")), (root, ("cpu.max", ""))]
        elif "cpu" in controllers.split(","):  # cgroup v1: mounted as cpu, cpu,cpuacct or cpuacct,cpu
            for name in dict.fromkeys((controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")):
                places += [(root / name / relative, ("cpu.cfs_quota_us", "cpu.cfs_period_us")),
                           (root / name, ("cpu.cfs_quota_us", "cpu.cfs_period_us"))]  # fmt: skip
    places += [(root, ("cpu.max", "")), (root / "cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us"))]
    for folder, (quota_file, period_file) in places:
        try:
            if period_file:
                quota_text = (folder / quota_file).read_text().strip()
                period_text = (folder / period_file).read_text().strip()
            else:
                quota_text, period_text = (folder / quota_file).read_text().split()[:2]
        except (OSError, ValueError):
            continue  # not this one
        if quota_text in ("max", "-1"):
            return None  # the first cgroup found sets no quota
        try:
            quota, period = int(quota_text), int(period_text)
        except ValueError:
            return None  # unexpected: no quota known
        return (quota, period) if quota > 0 and period > 0 else None
    return None


class OrtEngine:
    """An ONNX Runtime session.

    Args:
        path: The ``.onnx`` file.
        providers: Execution providers to request, in order.
        options: Session config entries (``vit_consumer.classifier.spin_options``).
    """

    name = ONNXRUNTIME
    parallel = 1  # one run at a time, every core on it (two 1-thread sessions measured no faster)
    precision = "fp32"  # of its inputs and outputs; an int8 file's GEMMs are int8 (its variant says so)
    requested_precision = "default"

    def __init__(self, path: str | os.PathLike, providers: list[str], options: dict[str, str]):
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        if budget := cpu_budget():
            session_options.intra_op_num_threads = budget  # else one thread per core it sees
        for key, value in options.items():
            session_options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises untyped errors for bad files
            raise EngineError(f"Not a loadable ONNX model: {path} ({exc})") from exc
        self.providers_used = self.session.get_providers()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        in_dims, out_dims, self.dtypes = contract.ort_io(self.session)
        self.io = (in_dims, out_dims)
        self.input_shape = tuple(-1 if d is None else d for d in self.io[0][0][1:])

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    run_alone = run  # one run at a time anyway


class OpenVinoEngine:
    """OpenVINO's CPU plugin on an ONNX file.

    One infer request per calling thread: a request is not safe to share, and the
    service calls the engine from its inference threads while start-up timing or
    ``predict`` may call it from another.

    Streams: with ``streams=1`` one request runs at a time with every core on it (OpenVINO's LATENCY
    hint: the fastest lone request). Otherwise (OpenVINO's THROUGHPUT hint) the cores are split into
    streams that each run one request: ``parallel`` requests at once, each slower alone, more images
    per second together (on the 2-core AMD EPYC of deploy/consumer/README.md, "OpenVINO's streams": batch
    32 at 1.47x the images per second of one 2-thread request). A lone request on one stream would use one
    core of two, so with streams the file is compiled a second time for it (``run_alone``, the LATENCY
    hint): a batch that has the machine to itself runs on every core.

    Args:
        path: The ``.onnx`` file.
        precision: ``"default"`` (the plugin's choice: bf16 on AMX/AVX512-BF16) or ``"f32"``.
        threads: ``INFERENCE_NUM_THREADS`` (None: the CPU quota's cores where there is one (``cpu_budget``), else
            OpenVINO's default, every core).
        streams: 1 (one request at a time), N (N streams), or 0 (OpenVINO's THROUGHPUT choice for this CPU).
    """

    name = OPENVINO

    def __init__(self, path: str | os.PathLike, precision: str = "default", threads: int | None = None,
                 streams: int = 1):  # fmt: skip
        ok, why = openvino_available()
        if not ok:
            raise EngineError(why)
        import openvino as ov

        if precision not in OV_PRECISIONS:
            raise EngineError(
                f"Expected an OpenVINO precision among {OV_PRECISIONS}. Received: {precision!r}"
            )
        self.requested_precision = precision
        if streams < 0:
            raise EngineError(f"Expected streams >= 0. Received: streams={streams}")
        config: dict[str, object] = {}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        threads = threads or cpu_budget()  # a CPU quota: the threads (and streams) fit in it
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        streaming = {"PERFORMANCE_HINT": "THROUGHPUT", **({"NUM_STREAMS": streams} if streams > 1 else {})}
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self._latency = core.compile_model(model, "CPU", {**config, **LATENCY})
            self.compiled = (
                self._latency if streams == 1 else core.compile_model(model, "CPU", {**config, **streaming})
            )
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with pages of context
            raise EngineError(
                f"OpenVINO cannot compile {Path(path).name}: {str(exc).splitlines()[0]}"
            ) from exc
        # The ONNX frontend keeps metadata_props under rt_info["framework"].
        self.metadata = _framework_info(model)
        hint = type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.precision = PRECISION_NAMES.get(hint, hint)
        # What the compiled model says, not the setting: the requests it runs at once to best effect.
        self.parallel = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.providers_used = [f"OpenVINO {ov.get_version().split('-')[0]} CPU ({self.precision})"]
        inp, out = self.compiled.inputs[0], self.compiled.outputs[0]
        self.input_name = inp.get_any_name()
        self.output_name = out.get_any_name()
        self.io = ([_ov_dims(i) for i in self.compiled.inputs], [_ov_dims(o) for o in self.compiled.outputs])
        self.dtypes = tuple(port.get_element_type().to_dtype().name for port in (inp, out))
        self.input_shape = tuple(-1 if d is None else d for d in self.io[0][0][1:])
        self._local = threading.local()

    def run(self, images: np.ndarray) -> np.ndarray:
        return self._infer(self.compiled, "request", images)

    def run_alone(self, images: np.ndarray) -> np.ndarray:
        return self._infer(self._latency, "alone", images)

    def _infer(self, compiled, slot: str, images: np.ndarray) -> np.ndarray:
        request = getattr(self._local, slot, None)
        if request is None:
            request = compiled.create_infer_request()
            setattr(self._local, slot, request)
        # The request reuses its output buffer on the next call: hand out a copy.
        return request.infer({0: images})[0].copy()


def _ov_dims(port) -> list[int | None]:
    shape = port.get_partial_shape()
    return [] if shape.rank.is_dynamic else [None if d.is_dynamic else d.get_length() for d in shape]


def type_name(value) -> str:
    """``bf16`` from an ``openvino.Type`` (whose str() is "<Type: 'bfloat16'>") or a plain string."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _framework_info(model) -> dict[str, str]:
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    framework = model.get_rt_info(["framework"]).astype(dict)
    return {str(k): str(v.astype(str) if hasattr(v, "astype") else v) for k, v in framework.items()}


def load(path: str | os.PathLike, engine: str = ONNXRUNTIME, precision: str = "default",
         providers: list[str] | None = None, options: dict[str, str] | None = None, streams: int = 1) -> Engine:  # fmt: skip
    """The engine ``engine`` (with ``precision``; OpenVINO with ``streams``) on ``path``; EngineError if it
    cannot load it here."""
    if engine == ONNXRUNTIME:
        return OrtEngine(path, providers or ["CPUExecutionProvider"], options or {})
    if engine == OPENVINO:
        return OpenVinoEngine(path, precision, streams=streams)
    raise EngineError(f"Expected an engine among {ENGINES}. Received: engine={engine!r}")
