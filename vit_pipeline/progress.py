"""How far long work is: a live bar on a terminal, plain lines in logs and CI.

The one place that reports progress (rich, which Prefect already brings). On a
terminal, training shows a per-step bar with its ETA and one summary line per
epoch, and every other long stage (export, parity, int8 calibration, candidate
gate, benchmark) a bar or a spinner with what it is doing. Without a terminal
(a log file, CI, a Prefect worker) nothing redraws: training prints one line per
epoch (Prefect's ``log_prints`` puts it in the flow run's log) and each stage
logs a line when it starts and one when it ends, with its duration.

``VIT_PIPELINE_PROGRESS=1`` forces the bars on (for example under ``script`` or
in a test's pseudo-terminal), ``=0`` forces them off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

ENV = "VIT_PIPELINE_PROGRESS"


def quiet_libraries() -> None:
    """Defaults for what other libraries put into a run's output (a variable set by hand wins), set before
    TensorFlow or MLflow is first used: by the CLI and at the start of every flow (a worker's flow run
    never goes through the CLI).

    * TensorFlow's C++ log on a machine without an NVIDIA device is one ERROR line about cuInit plus INFO
      lines about CUDA it will not use: not errors of this run, hidden (level 3). With a GPU, TensorFlow's
      errors (out of memory, cuDNN) stay visible (level 2).
    * MLflow's artifact download bars redraw with "\\r": off where stderr is not a terminal (a log, CI).
    * No usage pings: nothing here reaches the network but the stores.
    """
    from vit_consumer.contract import gpu_visible

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu_visible() else "3")
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


_lock = threading.Lock()
_live: dict[str, Any] = {"progress": None, "tasks": 0}


def interactive() -> bool:
    """Whether to draw live bars: stderr is a terminal (or ``VIT_PIPELINE_PROGRESS=1``)."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def _progress():
    """The process's one rich Progress (bars of concurrent stages stack in it)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with _lock:
        if _live["progress"] is None:
            console = Console(file=sys.stderr, force_terminal=True if os.environ.get(ENV) == "1" else None)
            _live["progress"] = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=False, redirect_stdout=False, redirect_stderr=False,
            )  # fmt: skip
            _live["progress"].start()
        _live["tasks"] += 1
        return _live["progress"]


def _release() -> None:
    with _lock:
        _live["tasks"] -= 1
        if _live["tasks"] == 0 and _live["progress"] is not None:
            _live["progress"].stop()
            _live["progress"] = None


class Tracker:
    """What a stage tells about itself: steps done, the total once known, a short status."""

    def __init__(self, description: str, total: float | None):
        self.description = description
        self.total = total
        self.done = 0.0
        self._bar = None
        self._task = None

    def advance(self, steps: float = 1, info: str | None = None) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, **({"info": info} if info is not None else {}))

    def update(
        self, total: float | None = None, description: str | None = None, info: str | None = None
    ) -> None:
        """Sets the total (when it becomes known), a new description or the status text."""
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        if self._bar is not None:
            fields = {"info": info} if info is not None else {}
            self._bar.update(self._task, total=self.total, description=self.description, **fields)

    def reset(self, total: float | None = None, description: str | None = None) -> None:
        """Starts the bar over (for example at each epoch)."""
        self.done = 0.0
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        if self._bar is not None:
            self._bar.reset(self._task, total=self.total, description=self.description)

    def line(self, text: str) -> None:
        """A line that stays: above the bars on a terminal, a plain print elsewhere."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)


def quiet() -> Tracker:
    """A tracker for callers not inside a reported stage: it only counts."""
    return Tracker("", None)


@contextlib.contextmanager
def task(description: str, total: float | None = None) -> Iterator[Tracker]:
    """Reports one stage of work while the block runs.

    Args:
        description: What is being done ("Parity: Keras vs ONNX Runtime").
        total: Steps the block will take (None: unknown, a spinner).

    Yields:
        A ``Tracker`` the block advances.
    """
    tracker = Tracker(description, total)
    start = time.perf_counter()
    if interactive():
        tracker._bar = _progress()
        tracker._task = tracker._bar.add_task(description, total=total, info="")
    else:
        log.info("%s ...", description)
    ended = "stopped after"  # what an exception (a Ctrl-C included) leaves it: not "done"
    try:
        yield tracker
        ended = "done in"
    finally:
        seconds = time.perf_counter() - start
        if tracker._bar is not None:
            tracker._bar.update(tracker._task, total=tracker.total or tracker.done or 1,
                                completed=tracker.total or tracker.done or 1)  # fmt: skip
            tracker._bar.stop_task(tracker._task)
            _release()
        steps = f", {tracker.done:g}/{tracker.total:g} steps" if tracker.total else ""
        log.info("%s: %s %.1f s%s", tracker.description, ended, seconds, steps)


def keras_callback(epochs: int, steps_per_epoch: int):
    """A Keras callback: a per-step bar with ETA on a terminal; one line per epoch always.

    Replaces Keras' own ``verbose`` output (two lines per epoch, or a bar that
    floods log files with carriage returns).
    """
    import keras

    class TrainingProgress(keras.callbacks.Callback):
        _stage = None

        def on_train_begin(self, logs=None):
            self._stage = task(f"Training ({epochs} epochs)", total=steps_per_epoch)
            self._tracker = self._stage.__enter__()

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._tracker.reset(total=steps_per_epoch, description=f"Epoch {epoch + 1}/{epochs}")

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            self._tracker.advance(1, info=f"loss {float(loss):.4f}" if loss is not None else None)

        def on_epoch_end(self, epoch, logs=None):
            figures = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted((logs or {}).items())
                                if k != "learning_rate")  # fmt: skip
            self._tracker.line(
                f"Epoch {epoch + 1}/{epochs}: {figures} ({time.perf_counter() - self._start:.1f} s)"
            )

        def on_train_end(self, logs=None):
            self.close()

        def close(self) -> None:
            """Ends the bar (also when training raised, which skips ``on_train_end``)."""
            if self._stage is not None:
                stage, self._stage = self._stage, None
                stage.__exit__(None, None, None)

    return TrainingProgress()
