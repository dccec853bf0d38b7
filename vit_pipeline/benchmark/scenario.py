"""The scenario: what is timed, how, and in which order (apart from the backends).

Each cell is warmed up, then timed until both a minimum count and a minimum
duration are reached; inputs are prepared before timing, so data loading is
never in the numbers (nanoGPT's ``bench.py`` way). Cells are measured in
alternating rounds, so a noisy machine slows every cell alike, and the medians
of the pooled samples are compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Scenario:
    """What to measure. Durations are per cell and round."""

    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    warmup: int = 3
    min_runs: int = 5
    min_seconds: float = 1.0
    rounds: int = 3


def measure(
    fn: Callable[[], Any], warmup: int = 3, min_runs: int = 10, min_seconds: float = 1.0
) -> list[float]:
    """Warm up, then time ``fn`` until ``min_runs`` and ``min_seconds`` are both reached."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def time_cells(
    backends: list[Any], scenario: Scenario, images: np.ndarray
) -> dict[tuple[int, int], list[float]]:
    """(backend index, batch size) -> latency samples in seconds, in alternating rounds."""
    from vit_pipeline.progress import task

    samples: dict[tuple[int, int], list[float]] = {}
    cells = len(scenario.batch_sizes) * scenario.rounds * len(backends)
    with task(
        f"Benchmark: {len(backends)} backends x {len(scenario.batch_sizes)} batch sizes", cells
    ) as shown:
        for bs in scenario.batch_sizes:
            batch = np.resize(images, (bs, *images.shape[1:])).astype(np.float32)
            runners = [b.prepare(batch) for b in backends]
            for _ in range(scenario.rounds):
                for i, run in enumerate(runners):
                    samples.setdefault((i, bs), []).extend(
                        measure(run, scenario.warmup, scenario.min_runs, scenario.min_seconds)
                    )
                    shown.advance(info=f"{backends[i].backend} {backends[i].variant} b{bs}")
    return samples
