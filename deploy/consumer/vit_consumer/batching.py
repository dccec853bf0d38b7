"""Dynamic batching: many requests, one ``session.run`` per batch, on an inference thread.

A request is queued by the thread that decoded it (``put``) and answered through
a ``concurrent.futures.Future``, which the event loop awaits. The inference
thread takes the oldest request, then everything else already queued (up to
``max_batch_size`` images), runs the batch, hands out the rows and goes straight
on to the next batch: neither the start of a batch nor the hand-out of its
answers waits for the event loop, which is busy with HTTP under load. For an
engine that runs one request at a time, every ``session.run`` happens on that one thread (run from alternating threads,
batch-1 calls ran slower in a side-by-side trial on the 2-core machine of
deploy/consumer/README.md).

When to wait for company: only for requests the service already has on their
way (``Arrivals``: admitted, not yet decoded and queued), and at most
``max_queue_delay_ms``. With nothing on its way, a batch runs at once, whatever
its size: a lone request on an idle service pays no batching delay, and under
load the engine never idles while work is queued.

An engine that runs several requests at once (OpenVINO's streams: ``parallel``)
gets as many inference threads, each forming and running its own batches from
the one queue: while one stream runs a batch, the next batch forms and runs on
another, instead of waiting for the first to finish. A batch that has the
machine to itself (its request came to an idle service, and nothing else is
formed, running, queued or on its way) runs on every core instead (the engine's
``run_alone``), and no other batch starts until it ends (a stream beside it would
slow both: three threads on two cores): a lone request is not slowed down by the
split. Two earlier rules measured
worse on the 2-core machine (deploy/consumer/README.md): a lone request that ran
the moment the engine fell idle held both cores while the others were still
being decoded (two batches in three at 32 clients held one or two images), and a
batch with company that always waited out the delay (Triton's
``max_queue_delay_microseconds``) left the engine idle for that long between
batches.

Each request keeps the engine (model version) it was admitted with: a batch
never mixes versions, so requests in flight during a reload finish on the
version they started with.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The request queue is at its bound: answer 503 with Retry-After."""


class BatcherStopped(QueueFull):
    """The service is shutting down: queued requests are not run (a 503 too)."""


@dataclass
class _Request:
    engine: Any  # has .run(np.ndarray) -> np.ndarray: logits of checked images; .run_alone with workers > 1
    images: np.ndarray
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    idle: bool = False  # it found no batch formed or running (under the batcher's lock)


class Arrivals:
    """How many requests are on their way to the engine: admitted, not yet decoded and queued.

    Args:
        on_leave: Called after a request leaves (the batcher re-checks whether to keep waiting).
    """

    def __init__(self, on_leave: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self.on_leave = on_leave

    def enter(self) -> Callable[..., None]:
        """Counts one request in; returns its ``leave(notify=True)`` (idempotent: call it on every path out;
        ``notify=False`` when the caller wakes the batcher itself, as ``put`` does)."""
        with self._lock:
            self._count += 1
        left = False

        def leave(notify: bool = True) -> None:
            nonlocal left
            with self._lock:
                if left:
                    return
                left = True
                self._count -= 1
            if notify and self.on_leave is not None:
                self.on_leave()

        return leave

    def __call__(self) -> int:
        return self._count


class DynamicBatcher:
    """Forms batches from queued requests and runs them one at a time on its own thread.

    Args:
        max_batch_size: Most images in one ``session.run`` (a larger request runs alone).
        max_queue_delay_ms: Longest a batch waits for requests on their way before it runs.
        max_queue: Most requests waiting; ``put`` raises ``QueueFull`` beyond it.
        on_batch: Called with (batch size, seconds each request waited, seconds the run took) after each
            batch, on the inference thread.
        coming: How many requests are on their way (``Arrivals``); None: never any.
        workers: Inference threads (the engine's ``parallel``: requests it runs at once).
    """

    def __init__(
        self,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue: int = 256,
        on_batch: Callable[[int, list[float], float], None] | None = None,
        coming: Callable[[], int] | None = None,
        workers: int = 1,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0 or workers < 1:
            raise ValueError(
                "Expected max_batch_size >= 1, max_queue >= 1, max_queue_delay_ms >= 0, workers >= 1. Received: "
                f"max_batch_size={max_batch_size}, max_queue={max_queue}, max_queue_delay_ms={max_queue_delay_ms}, "
                f"workers={workers}"
            )
        self.workers = workers
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._coming = coming or (lambda: 0)
        self._queue: collections.deque[_Request] = collections.deque()
        self._changed = threading.Condition()  # a request queued, one on its way left, or stopping
        self._stopping = False
        self._threads: dict[int, threading.Thread] = {}  # by index; one at or above ``workers`` ends
        self._started = False
        self._busy = 0  # inference threads holding a batch, forming or running it (under _changed)
        self._alone = False  # a batch runs on every core: no other starts until it ends (under _changed)

    def start(self) -> None:
        with self._changed:
            self._started = True
            self._spawn()

    def set_workers(self, workers: int) -> None:
        """As many inference threads as the engine served now runs requests at once (a reload may change it).

        Threads above the new count end after their batch; new ones start at once.
        """
        if workers < 1:
            raise ValueError(f"Expected workers >= 1. Received: workers={workers}")
        with self._changed:
            self.workers = workers
            self._changed.notify_all()  # an idle thread above the count ends now
            if self._started:
                self._spawn()

    def _spawn(self) -> None:  # under _changed
        for i in range(self.workers):
            if i not in self._threads and not self._stopping:
                self._threads[i] = threading.Thread(
                    target=self._loop, args=(i,), name=f"inference-{i}", daemon=True
                )
                self._threads[i].start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the threads after the batches they run; requests still queued fail with ``BatcherStopped``."""
        with self._changed:
            self._stopping = True
            threads = list(self._threads.values())
            left = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
        for request in left:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(BatcherStopped("The service is stopping"))
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def depth(self) -> int:
        return len(self._queue)

    def nudge(self) -> None:
        """Wakes a batch that waits for requests on their way (one of them has left)."""
        with self._changed:
            self._changed.notify_all()

    def put(self, engine, images: np.ndarray, arrived: Callable[..., None] | None = None) -> Future:
        """Queues ``images`` for ``engine`` from any thread; the future gives their logits.

        ``arrived``: the request's ``Arrivals`` leave, called as it joins the queue (one wake-up, not two).

        Raises:
            QueueFull: ``max_queue`` requests are waiting already.
            BatcherStopped: the service is stopping.
        """
        request = _Request(engine, images)
        with self._changed:
            if self._stopping:
                raise BatcherStopped("The service is stopping")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting")
            request.idle = self._busy == 0
            self._queue.append(request)
            if arrived is not None:
                arrived(notify=False)
            self._changed.notify_all()
        return request.future

    def _collect(self, index: int) -> tuple[list[_Request], bool] | None:
        """The next batch and whether it has the machine to itself (None: this thread ends); blocks until there
        is one."""
        with self._changed:
            while (not self._queue or self._alone) and not self._stopping and index < self.workers:
                self._changed.wait()
            if self._stopping:
                return None
            if index >= self.workers:
                del self._threads[index]  # a later set_workers may start this index again
                return None
            first = self._queue.popleft()
            self._busy += 1
            batch, size = [first], len(first.images)
            deadline = time.perf_counter() + self.max_queue_delay
            while size < self.max_batch_size and not self._stopping:
                if self._queue:
                    head = self._queue[0]
                    if head.engine is not first.engine or size + len(head.images) > self.max_batch_size:
                        break  # it starts the next batch
                    batch.append(self._queue.popleft())
                    size += len(head.images)
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._coming():
                    break
                self._changed.wait(remaining)
            # Only with more than one thread (with one, every batch has the machine to itself anyway), and only
            # for a request that came to an idle service: those that queue behind a lone batch run on the
            # streams, else the service would stay one batch at a time under load.
            alone = (self.workers > 1 and first.idle and self._busy == 1 and not self._queue
                     and not self._coming())  # fmt: skip
            self._alone = alone
        # A request whose wait was cancelled (a timeout) before its batch began is dropped here.
        return [r for r in batch if r.future.set_running_or_notify_cancel()], alone

    def _loop(self, index: int) -> None:
        while (collected := self._collect(index)) is not None:
            batch, alone = collected
            if batch:
                self._run(batch, alone)
            else:
                self._ran(alone)

    def _ran(self, alone: bool) -> None:
        """A batch's engine call is over (before its answers go out: a request they release finds it so)."""
        with self._changed:
            self._busy -= 1
            if alone:
                self._alone = False
                self._changed.notify_all()  # the other threads may start batches again

    def _run(self, batch: list[_Request], alone: bool = False) -> None:
        formed = time.perf_counter()  # the queue wait ends here
        try:
            images = np.concatenate([r.images for r in batch]) if len(batch) > 1 else batch[0].images
            engine = batch[0].engine
            started = time.perf_counter()
            logits = engine.run_alone(images) if alone else engine.run(images)
            seconds = time.perf_counter() - started
        except Exception as exc:  # one bad batch fails its requests, not the service
            self._ran(alone)
            for r in batch:
                r.future.set_exception(exc)
            return
        self._ran(alone)
        offset = 0
        for r in batch:
            n = len(r.images)
            r.future.set_result(logits[offset : offset + n])
            offset += n
        if self.on_batch is not None:
            try:
                self.on_batch(len(images), [formed - r.enqueued for r in batch], seconds)
            except Exception:  # metrics must not end the inference thread
                log.exception("Recording a batch failed")
