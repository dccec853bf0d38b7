"""The infra-validation stage (after export, before the alias moves): the real consumer serves the file.

TFX's InfraValidator loads a candidate in the serving binary it will run in, in a sandbox,
and sends it real requests before the Pusher may push it. Parity in the export stage runs
the file in ONNX Runtime in-process; that says nothing of whether the consumer (another
package, other dependencies, its own checks of the metadata) will load and answer with it.
So here, for the served file and every serving candidate registered with it:

1. ``python -m vit_consumer --model FILE serve --no-choose`` starts as a separate process
   (its own process group) on a free loopback port;
2. ``/health/ready`` is awaited (``infra_timeout_seconds``; a process that exits is a
   failure with the last line it printed);
3. ``infra_images`` real test images are posted as every documented content type: each as
   ``image/png`` and ``image/jpeg`` (one image a request), all together as
   ``application/json`` (``{"instances": ...}``) and ``application/x-npy``;
4. every answer must equal the stage's own prediction for the same input (ONNX Runtime
   in-process, the file's calibrated temperature; a JPEG as PIL decodes it): the same top-1
   class, and its probability within ``PROBABILITY_TOLERANCE``.

The outcome is the run tag ``gate.infra_validation`` (``passed: ...`` or ``failed: <reason>``);
the register stage registers the version anyway and does not promote it when it failed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_pipeline.fsutil import own_session_ended_with_parent

if TYPE_CHECKING:
    from vit_pipeline.context import StageContext

PROBABILITY_TOLERANCE = 1e-3  # batching changes the summation order of float32 logits, not more
CONTENT_TYPES = ("image/png", "image/jpeg", "application/json", "application/x-npy")


class InfraValidationFailed(Exception):
    """One check failed; the message is the reason recorded (one line)."""


@dataclass
class InfraValidation:
    """What the consumer did with each file it was given."""

    passed: bool
    reason: str
    files: list[str]
    requests: int = 0
    seconds: float = 0.0
    checked: dict[str, int] = field(default_factory=dict)  # content type -> images answered

    @property
    def outcome(self) -> str:
        if not self.passed:
            return f"failed: {self.reason}"
        kinds = ", ".join(f"{k} {v}" for k, v in self.checked.items())
        return (f"passed: the consumer served {len(self.files)} file(s) and answered {self.requests} requests "
                f"({kinds} images) as this stage predicts, in {self.seconds:.1f} s")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"outcome": self.outcome}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _post(url: str, body: bytes, content_type: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise InfraValidationFailed(f"POST {content_type} answered {exc.code}: {detail}") from None
    except OSError as exc:
        raise InfraValidationFailed(f"POST {content_type} failed: {exc}") from None


class ConsumerProcess:
    """``python -m vit_consumer --model FILE serve`` in its own process group, stopped on exit."""

    def __init__(self, model: str | Path, log_path: Path, timeout: float):
        self.model, self.log_path, self.timeout = str(model), log_path, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ConsumerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        from vit_consumer.settings import ENV_PREFIX

        # The file is validated as the consumer serves it by default: a VIT_ENGINE, VIT_MAX_BYTES, ... set
        # for some other service in this shell would change (or break) what is checked.
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
            "PYTHONUNBUFFERED": "1"
        }
        # -P: the working directory stays off sys.path (a local inspect.py or json.py broke the consumer's start,
        # and infra validation blocked the version for it).
        cmd = [sys.executable, "-P", "-m", "vit_consumer", "--model", self.model, "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--no-choose", "--reload-seconds", "0"]  # fmt: skip
        with open(self.log_path, "wb") as log:
            # Stopped by __exit__, or with this process if it is SIGKILLed (it stayed, holding its port).
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=own_session_ended_with_parent()
            )
        try:
            self._wait_ready()
        except BaseException:  # __exit__ is not called when __enter__ raises: stop it here
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InfraValidationFailed(
                    f"the consumer exited with {self.proc.returncode}: {self.last_line()}"
                )
            if _get(f"{self.url}/health/ready", timeout=2) == 200:
                return
            time.sleep(0.2)
        raise InfraValidationFailed(
            f"the consumer was not ready within {self.timeout:g} s: {self.last_line()}"
        )

    def last_line(self) -> str:
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln]
        return ((errors or lines or ["no output"])[-1]).strip()[:300]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decoded(payload: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), np.float32)


def expected(path: str | Path, images: np.ndarray) -> list[tuple[int, float]]:
    """The stage's own answer per image: top-1 index and its probability (the file's temperature)."""
    from vit_consumer import contract

    from vit_pipeline.export import ort_session, run_onnx

    session = ort_session(path)
    temperature = contract.temperature(session.get_modelmeta().custom_metadata_map)
    probs = contract.softmax(run_onnx(session, images.astype(np.float32), 64), temperature)
    return [(int(p.argmax()), float(p.max())) for p in probs]


def _compare(kind: str, answers: list[list[dict]], wanted: list[tuple[int, float]], first: int) -> None:
    if len(answers) != len(wanted):
        raise InfraValidationFailed(f"{kind}: {len(answers)} answers for {len(wanted)} images")
    for i, (answer, (index, probability)) in enumerate(zip(answers, wanted, strict=True)):
        top = answer[0]
        if top["index"] != index or abs(top["probability"] - probability) > PROBABILITY_TOLERANCE:
            raise InfraValidationFailed(
                f"{kind}: test image {first + i} answered class {top['index']} p={top['probability']:.5f}, "
                f"the stage predicts class {index} p={probability:.5f}"
            )


def check_file(path: str | Path, images: np.ndarray, log_path: Path, timeout: float) -> dict[str, int]:
    """Serves ``path`` with the consumer and checks every content type; returns images per type."""
    png = [_encode(img, "PNG") for img in images]
    jpeg = [_encode(img, "JPEG") for img in images]
    checked = {}
    with ConsumerProcess(
        path, log_path, timeout
    ) as server:  # first: whether the consumer takes the file at all
        try:
            wanted = expected(path, images)
            wanted_jpeg = expected(path, np.stack([_decoded(b) for b in jpeg]))
        except Exception as exc:  # the consumer took a file this stage cannot run: still a failure
            raise InfraValidationFailed(f"the stage could not predict with the file: {exc}") from None
        url = f"{server.url}/predict?top_k=1"
        for kind, bodies, want in (("image/png", png, wanted), ("image/jpeg", jpeg, wanted_jpeg)):
            answers = [_post(url, body, kind, timeout)["predictions"][0] for body in bodies]
            _compare(kind, answers, want, 0)
            checked[kind] = len(bodies)
        doc = json.dumps({"instances": images.astype(np.float32).tolist()}).encode()
        _compare("application/json", _post(url, doc, "application/json", timeout)["predictions"], wanted, 0)
        checked["application/json"] = len(images)
        buf = io.BytesIO()
        np.save(buf, images.astype(np.float32), allow_pickle=False)
        answers = _post(url, buf.getvalue(), "application/x-npy", timeout)["predictions"]
        _compare("application/x-npy", answers, wanted, 0)
        checked["application/x-npy"] = len(images)
    return checked


def validate(files: list[str | Path], images: np.ndarray, work_dir: Path, timeout: float) -> InfraValidation:
    """Every file in turn; the first failure is the outcome."""
    start = time.monotonic()
    totals: dict[str, int] = {}
    requests = 0
    for k, path in enumerate(files):
        try:
            checked = check_file(path, images, work_dir / f"consumer-{k}.log", timeout)
        except InfraValidationFailed as exc:
            return InfraValidation(False, f"{Path(path).name}: {exc}", [str(f) for f in files],
                                   seconds=time.monotonic() - start)  # fmt: skip
        for kind, n in checked.items():
            totals[kind] = totals.get(kind, 0) + n
        requests += 2 * len(images) + 2
    return InfraValidation(True, "", [str(f) for f in files], requests, time.monotonic() - start, totals)


# ------------------------------------------------------------------- the stage
def run(ctx: StageContext, data_path: str, onnx_path: str) -> InfraValidation:
    """Validates the served file and the candidates listed beside it; records the outcome."""
    from vit_consumer.contract import CandidatesManifest

    from vit_pipeline.data import Splits

    cfg = ctx.cfg
    splits = Splits.load(data_path)
    images = np.asarray(splits.x_test[: cfg.infra_images])
    manifest = CandidatesManifest.find(Path(onnx_path).parent)
    files = [onnx_path, *(manifest.files(Path(onnx_path).parent).values() if manifest else [])]
    result = validate(files, images, ctx.work_dir / "infra-validation", cfg.infra_timeout_seconds)
    ctx.log.dict(result.to_dict(), "infra_validation/result.json")
    ctx.log.tags({"gate.infra_validation": result.outcome[:5000]})
    ctx.log.metrics(
        {"infra_validation_passed": float(result.passed), "infra_validation_seconds": result.seconds}
    )
    return result
