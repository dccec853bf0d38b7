"""Choose, on this machine, which registered candidate to serve.

vit-pipeline registers the served file (``model.onnx``) with other serving
candidates that passed an agreement gate at export (for example a static int8
graph), as ``extra_files/`` of the same model version, listed in
``extra_files/candidates.json``. The machine that trains is often not the one
that serves, and which file is fastest depends on the CPU (VNNI/AMX int8
kernels, cache sizes), so the choice is made here, as TensorRT builds its engine
on the target: each candidate is timed briefly at start-up on this CPU, and the
fastest one serves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vit_consumer.contract import REGISTERED_DIR, CandidatesManifest, fastest
from vit_consumer.engines import ONNXRUNTIME, OPENVINO, openvino_available, parse_spec, spec_label

log = logging.getLogger(__name__)

AUTO = "auto"  # every installed engine that passes the gate


def registered_candidates(model_path: Path) -> dict[str, Path]:
    """Candidate name -> file beside ``model_path`` (none for a plain .onnx file)."""
    manifest = _manifest(model_path)
    if manifest is None:
        return {}
    folder = model_path.parent / REGISTERED_DIR
    return {name: path for name, path in manifest.files(folder).items() if path.is_file()}


def _manifest(model_path: Path) -> CandidatesManifest | None:
    try:
        return CandidatesManifest.find(model_path.parent / REGISTERED_DIR)
    except ValueError as exc:
        log.warning("Ignoring an unreadable manifest: %s", exc)
        return None


@dataclass(frozen=True)
class Gate:
    """Real test images and the fp32 Keras logits on them, registered by the export: the agreement
    gate, run again on the machine that serves (whose CPU decides bf16, int8 kernels, ...)."""

    images: np.ndarray
    logits: np.ndarray
    min_agreement: float

    def agreement(self, classifier) -> float:
        """Top-1 agreement of ``classifier`` with the reference logits."""
        batch = 64
        predicted = np.concatenate([classifier.run(np.ascontiguousarray(self.images[i : i + batch], np.float32))
                                    for i in range(0, len(self.images), batch)])  # fmt: skip
        return float((predicted.argmax(1) == self.logits.argmax(1)).mean())


def registered_gate(model_path: Path, input_shape: tuple[int, ...]) -> Gate | None:
    """The gate images registered beside ``model_path`` (None: none, or not usable here)."""
    manifest = _manifest(model_path)
    if manifest is None or manifest.gate is None:
        return None
    path = model_path.parent / REGISTERED_DIR / manifest.gate["file"]
    try:
        with np.load(path, allow_pickle=False) as doc:  # never unpickle what a store hands over
            images, logits = doc["images"], doc["logits"]
    except (OSError, KeyError, ValueError) as exc:
        log.warning("Ignoring unreadable gate images %s: %s", path, exc)
        return None
    if (
        images.ndim != 4
        or tuple(images.shape[1:]) != tuple(input_shape)
        or logits.shape[:1] != images.shape[:1]
    ):
        log.warning("Ignoring gate images %s of shape %s for input %s", path, images.shape, input_shape)
        return None
    return Gate(images, logits, manifest.min_agreement)


def engine_settings(engine: str) -> list[tuple[str, str]]:
    """The (engine, precision) settings ``engine`` lets the service consider.

    ``auto``: ONNX Runtime, and OpenVINO at its default precision and at f32 where it
    is installed. Anything else: that one setting (``openvino-f32`` -> OpenVINO at f32).
    """
    if engine != AUTO:
        return [parse_spec(engine)]
    out = [(ONNXRUNTIME, "default")]
    ok, why = openvino_available()
    if ok:
        out += [(OPENVINO, "default"), (OPENVINO, "f32")]
    else:
        log.info("OpenVINO is not a candidate here: %s", why)
    return out


def candidate_name(file: str, engine: str, precision: str) -> str:
    """``registered`` / ``int8-static`` on ONNX Runtime; ``registered@openvino-f32`` on another engine."""
    return file if engine == ONNXRUNTIME else f"{file}@{spec_label(engine, precision)}"


def candidate_pool(model_path: Path, served_name: str, settings: list[tuple[str, str]], gated: bool,
                   load: Callable[[Path, tuple[str, str], str], Any]) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    """Every registered file (the served one and the manifest's candidates) on every engine setting, loaded.

    Args:
        served_name: The classifier already serving (not loaded again).
        gated: Whether gate images are registered: another engine than ONNX Runtime (whose
            agreement the export measured) is a candidate only if it can be gated here.
        load: ``(file, (engine, precision), name) -> classifier``; raises ``InputError`` for a file
            the engine cannot load.

    Returns:
        (name -> loaded classifier, name -> why it is not a candidate).
    """
    from vit_consumer.classifier import InputError

    files = {"registered": model_path, **registered_candidates(model_path)}
    manifest = _manifest(model_path)
    # A candidate file's metadata carries the export's (Keras) test accuracy; its own, measured by the export's
    # gate, is the manifest's: what /health reports when it serves.
    measured = {n: c["test_accuracy"] for n, c in (manifest.candidates.items() if manifest else ())
                if isinstance(c.get("test_accuracy"), float)}  # fmt: skip
    loaded, skipped = {}, {}
    for setting in settings:
        for file_name, file in files.items():
            name = candidate_name(file_name, *setting)
            if name == served_name or (setting == (OPENVINO, "f32") and file_name.startswith("int8")):
                continue  # already serving; an int8 file's GEMMs are int8 at either precision hint
            if setting[0] != ONNXRUNTIME and not gated:
                skipped[name] = "no gate images registered (an older export, or a plain file)"
                continue
            try:
                clf = load(file, setting, name)
            except InputError as exc:
                skipped[name] = f"does not load here ({exc})"
                continue
            twin = loaded.get(candidate_name(file_name, setting[0], "default"))
            if twin is not None and twin.runtime.precision == clf.runtime.precision:
                continue  # OpenVINO's default is f32 on this CPU: the same engine twice
            if file_name in measured:
                clf.metadata = {**clf.metadata, "test_accuracy": f"{measured[file_name]:.6f}"}
            loaded[name] = clf
    return loaded, skipped


def throughput(classifier, batch_sizes: tuple[int, ...], seconds: float) -> dict[int, float]:
    """img/s of ``classifier.run`` per batch size, after one warm-up run each (zeros suffice: time, not value).

    An engine that runs ``parallel`` requests at once (OpenVINO's streams) is timed as the service runs it:
    that many threads, each warming up its own request, then calling it in turn.
    """
    out = {}
    for bs in batch_sizes:
        x = np.zeros((bs, *classifier.input_shape), np.float32)
        calls, wall = time_calls(classifier.run, x, seconds, classifier.runtime.parallel)
        out[bs] = len(calls) * bs / wall
    return out


def time_calls(run: Callable[[np.ndarray], Any], x: np.ndarray, seconds: float, workers: int = 1,
               warm_up: int = 1, min_calls: int = 3) -> tuple[list[float], float]:  # fmt: skip
    """``workers`` threads call ``run(x)`` at once for ``seconds``: (every call's seconds, wall seconds).

    Each thread warms up first (its own OpenVINO request); the clock starts when every one is warm.
    """
    latencies: list[float] = []
    failed: list[BaseException] = []
    ready = threading.Barrier(workers + 1)

    def calls() -> None:
        try:
            for _ in range(warm_up):
                run(x)
            ready.wait()
            start, own = time.perf_counter(), []
            while len(own) < min_calls or time.perf_counter() - start < seconds:
                t = time.perf_counter()
                run(x)
                own.append(time.perf_counter() - t)
            latencies.extend(own)  # one list.extend per thread: atomic under the GIL
        except threading.BrokenBarrierError:
            pass  # another thread failed: its error is raised
        except BaseException as exc:  # raised in the caller, not lost with this thread
            failed.append(exc)
            ready.abort()  # nobody waits for this thread's warm-up for ever

    threads = [threading.Thread(target=calls, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return latencies, time.perf_counter() - start


def choose(served, candidates: dict[str, Any], batch_sizes: tuple[int, ...], seconds: float = 0.3,
           gate: Gate | None = None, refused: dict[str, str] | None = None):  # fmt: skip
    """The fastest of ``served`` (the registered file) and ``candidates`` (loaded classifiers).

    A candidate must agree with the served file's contract (class names, input
    shape) and, where the export registered gate images, keep the gate's top-1
    agreement with Keras on this machine. Timed in two alternating rounds; the
    score is the geometric mean of img/s over ``batch_sizes``.

    Returns:
        (the chosen classifier, a report for /health and the log).
    """
    refused = dict(refused or {})
    agreement: dict[str, float] = {}
    pool = {served.name: served}
    for name, clf in candidates.items():
        if clf.class_names != served.class_names or clf.input_shape != served.input_shape:
            refused[name] = "another contract (class names or input shape)"
            continue
        if gate is not None:
            agreement[name] = round(gate.agreement(clf), 4)
            if agreement[name] < gate.min_agreement:
                refused[name] = (f"top-1 agreement with Keras {agreement[name]:.2%} < {gate.min_agreement:.1%} "
                                 f"on {len(gate.images)} registered test images")  # fmt: skip
                continue
        pool[name] = clf
    for name, why in refused.items():
        log.warning("Candidate %s is not considered: %s", name, why)
    common = {"engine": served.engine, "precision": served.runtime.precision, "refused": refused,
              "gate_agreement": agreement}  # fmt: skip
    if len(pool) == 1:
        why = "no other candidate passed" if candidates or refused else "no other candidate registered"
        return served, {"served": served.name, **common, "reason": why}
    rounds: dict[str, list[dict[int, float]]] = {name: [] for name in pool}
    for _ in range(2):
        for name, clf in pool.items():
            rounds[name].append(throughput(clf, batch_sizes, seconds))
    # Each file's best round per batch size: the machine's noise only ever slows a round down.
    best, scores = fastest(
        {name: [max(r[bs] for r in runs) for bs in batch_sizes] for name, runs in rounds.items()}
    )
    chosen = pool[best]
    report = {"served": best, **common, "engine": chosen.engine, "precision": chosen.runtime.precision,
              "scores_ips_geomean": {k: round(v, 1) for k, v in scores.items()}, "batch_sizes": list(batch_sizes),
              "reason": f"fastest on this CPU at start-up ({scores[best]:.0f} img/s geometric mean)"}  # fmt: skip
    log.info("Serving candidate %s: %s", best, report["scores_ips_geomean"])
    return chosen, report
