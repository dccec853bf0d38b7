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

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from vit_consumer.contract import REGISTERED_DIR, CandidatesManifest, fastest

log = logging.getLogger(__name__)


def registered_candidates(model_path: Path) -> dict[str, Path]:
    """Candidate name -> file beside ``model_path`` (none for a plain .onnx file)."""
    folder = model_path.parent / REGISTERED_DIR
    try:
        manifest = CandidatesManifest.find(folder)
    except ValueError as exc:
        log.warning("Ignoring an unreadable manifest: %s", exc)
        return {}
    if manifest is None:
        return {}
    return {name: path for name, path in manifest.files(folder).items() if path.is_file()}


def throughput(classifier, batch_sizes: tuple[int, ...], seconds: float) -> dict[int, float]:
    """img/s of ``classifier.run`` per batch size, after one warm-up run each (zeros suffice: time, not value)."""
    out = {}
    for bs in batch_sizes:
        x = np.zeros((bs, *classifier.input_shape), np.float32)
        classifier.run(x)
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < seconds:
            classifier.run(x)
            n += 1
        out[bs] = n * bs / (time.perf_counter() - start)
    return out


def choose(served, candidates: dict[str, Any], batch_sizes: tuple[int, ...], seconds: float = 0.3):
    """The fastest of ``served`` (the registered file) and ``candidates`` (loaded classifiers).

    A candidate must agree with the served file's contract (class names, input
    shape). Timed in two alternating rounds; the score is the geometric mean of
    img/s over ``batch_sizes``.

    Returns:
        (the chosen classifier, a report for /health and the log).
    """
    pool = {"registered": served}
    for name, clf in candidates.items():
        if clf.class_names != served.class_names or clf.input_shape != served.input_shape:
            log.warning("Candidate %s has another contract; not considered", name)
            continue
        pool[name] = clf
    if len(pool) == 1:
        return served, {"served": "registered", "reason": "no other candidate registered"}
    rounds: dict[str, list[dict[int, float]]] = {name: [] for name in pool}
    for _ in range(2):
        for name, clf in pool.items():
            rounds[name].append(throughput(clf, batch_sizes, seconds))
    # Each file's best round per batch size: the machine's noise only ever slows a round down.
    best, scores = fastest(
        {name: [max(r[bs] for r in runs) for bs in batch_sizes] for name, runs in rounds.items()}
    )
    report = {"served": best, "scores_ips_geomean": {k: round(v, 1) for k, v in scores.items()},
              "batch_sizes": list(batch_sizes),
              "reason": f"fastest on this CPU at start-up ({scores[best]:.0f} img/s geometric mean)"}  # fmt: skip
    log.info("Serving candidate %s: %s", best, report["scores_ips_geomean"])
    return pool[best], report
