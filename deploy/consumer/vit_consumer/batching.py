"""Dynamic batching: many requests, one ``session.run`` per batch, off the event loop.

Requests wait in a bounded queue. One worker task takes the oldest request,
then everything else already queued (up to ``max_batch_size`` images), and runs
the batch in a single-thread executor, so the event loop keeps accepting,
decoding and answering while ONNX Runtime computes. Under load, requests pile up
while a batch runs and the next batch takes them all; with no queue a request
runs at once, paying no batching delay. ``max_queue_delay_ms`` (Triton's
``max_queue_delay_microseconds``) lets a batch that has company but is not full
wait that long for more.

Each request keeps the engine (model version) it was admitted with: a batch
never mixes versions, so requests in flight during a reload finish on the
version they started with.

``run_now`` is the idle fast path: a thread that has just decoded a request
hands it straight to the inference thread when nothing waits, nothing else is on
its way (``Arrivals``: requests admitted and not yet decoded) and the engine is
free, skipping the batcher's queue and its event-loop round trip. A lone queued
request that has others on their way waits for them (up to
``max_queue_delay_ms``) instead of running alone: under load, a batch of one
started the moment the engine fell idle held both cores while the others were
still being decoded, and at 32 clients two batches in three were of one or two
images (deploy/consumer/README.md). Every
``session.run`` happens on that one thread, fast path or batch: run from
alternating threads (the decode pool's), batch-1 calls ran slower in a
side-by-side trial on the 2-core machine of deploy/consumer/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QueueFull(Exception):
    """The request queue is at its bound: answer 503 with Retry-After."""


@dataclass
class _Request:
    engine: Any  # has .run(np.ndarray) -> np.ndarray: logits of checked images
    images: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Arrivals:
    """How many requests are on their way to the engine: admitted, not yet decoded and handed over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def enter(self) -> Callable[[], None]:
        """Counts one request in; returns its ``leave`` (idempotent: call it on every path out)."""
        with self._lock:
            self._count += 1
        left = False

        def leave() -> None:
            nonlocal left
            with self._lock:
                if not left:
                    left = True
                    self._count -= 1

        return leave

    def __call__(self) -> int:
        return self._count


class DynamicBatcher:
    """Forms batches from queued requests and runs them one at a time.

    Args:
        max_batch_size: Most images in one ``session.run`` (a larger request runs alone).
        max_queue_delay_ms: How long a non-full batch that already has company waits for more.
        max_queue: Most requests waiting; ``submit`` raises ``QueueFull`` beyond it.
        on_batch: Called with (batch size, seconds each request waited, seconds the run took) after each batch.
        coming: How many requests are on their way (``Arrivals``); None: never any.
    """

    def __init__(
        self,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue: int = 256,
        on_batch: Callable[[int, list[float], float], None] | None = None,
        coming: Callable[[], int] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0:
            raise ValueError(
                "Expected max_batch_size >= 1, max_queue >= 1, max_queue_delay_ms >= 0. Received: "
                f"max_batch_size={max_batch_size}, max_queue={max_queue}, max_queue_delay_ms={max_queue_delay_ms}"
            )
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=max_queue)
        self.on_batch = on_batch
        self._coming = coming or (lambda: 0)
        self._carry: _Request | None = None  # the request that started a new engine's batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None
        self._state = threading.Lock()  # guards _busy: runs submitted and not finished, either path
        self._busy = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> int:
        return self.queue.qsize() + (self._carry is not None)

    def run_now(self, engine, images: np.ndarray, counted: int = 0) -> Future | None:
        """Starts ``images`` on the inference thread at once if nothing waits, nothing else is on its way and
        the engine is idle.

        Any thread may call it. ``counted``: 1 when the caller's own request is among ``coming``'s.
        Returns the run's future (logits), or None: ``submit`` it.
        """
        with self._state:
            if self._busy or self.depth() or self._coming() > counted or len(images) > self.max_batch_size:
                return None
            self._busy += 1
        running = self._executor.submit(self._fast_run, engine, images)
        # Done, failed or cancelled before it started (a request timeout): the engine is free again.
        running.add_done_callback(lambda _: self._done())
        return running

    def _fast_run(self, engine, images: np.ndarray) -> np.ndarray:
        logits, seconds = self._timed_run(engine, images)
        if self.on_batch is not None:
            self.on_batch(len(images), [0.0], seconds)
        return logits

    def _timed_run(self, engine, images: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        return engine.run(images), time.perf_counter() - started

    def _done(self) -> None:
        with self._state:
            self._busy -= 1

    async def submit(
        self, engine, images: np.ndarray, on_queued: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Queues ``images`` for ``engine``; returns their logits (raises ``QueueFull``).

        ``on_queued`` is called once the request is in the queue (it is no longer on its way).
        """
        request = _Request(engine, images, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue.maxsize} requests are waiting") from None
        if on_queued is not None:
            on_queued()
        return await request.future

    async def _next(self) -> _Request:
        if self._carry is not None:
            request, self._carry = self._carry, None
            return request
        return await self.queue.get()

    async def _collect(self) -> list[_Request]:
        first = await self._next()
        batch, size = [first], len(first.images)
        deadline = time.perf_counter() + self.max_queue_delay
        while size < self.max_batch_size:
            try:
                request = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                # Wait for company if there is some already, or some on its way; a lone request runs at once.
                remaining = deadline - time.perf_counter()
                if (len(batch) == 1 and not self._coming()) or remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if request.engine is not first.engine or size + len(request.images) > self.max_batch_size:
                self._carry = request  # starts the next batch
                break
            batch.append(request)
            size += len(request.images)
        return [r for r in batch if not r.future.done()]  # timed-out requests are dropped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()  # the queue wait ends here: the batch is formed
            images = np.concatenate([r.images for r in batch]) if len(batch) > 1 else batch[0].images
            with self._state:
                self._busy += 1
            try:
                logits, seconds = await loop.run_in_executor(
                    self._executor, self._timed_run, batch[0].engine, images
                )
            except Exception as exc:  # one bad batch fails its requests, not the service
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            finally:
                self._done()
            if self.on_batch is not None:
                self.on_batch(len(images), [started - r.enqueued for r in batch], seconds)
            offset = 0
            for r in batch:
                n = len(r.images)
                if not r.future.done():
                    r.future.set_result(logits[offset : offset + n])
                offset += n
