"""The dynamic batcher on its own: every session.run on one thread, the idle fast path's bookkeeping."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from vit_consumer.batching import DynamicBatcher


class RecordingEngine:
    """Logits = the images' first pixel; remembers which thread ran each call."""

    def __init__(self, seconds: float = 0.0):
        self.threads: list[int] = []
        self.seconds = seconds

    def run(self, images: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        time.sleep(self.seconds)
        return images[:, 0, 0, :1].copy()


def _images(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 3), value, np.float32)


def test_fast_path_and_batches_run_on_one_thread_with_their_own_rows():
    engine = RecordingEngine(seconds=0.01)

    async def scenario():
        batcher = DynamicBatcher(max_batch_size=8, max_queue_delay_ms=5)
        batcher.start()
        pool = ThreadPoolExecutor(2)  # like the service's decode threads
        loop = asyncio.get_running_loop()
        # Idle: a decode thread starts the run at once (a future), from either pool thread.
        fast = []
        for value in (1.0, 2.0):
            running = await loop.run_in_executor(pool, batcher.run_now, engine, _images(value))
            assert running is not None
            fast.append(float((await asyncio.wrap_future(running))[0, 0]))
        # Busy: while a run is in progress the fast path declines; queued requests share a batch.
        running = await loop.run_in_executor(pool, batcher.run_now, engine, _images(3.0))
        assert batcher.run_now(engine, _images(4.0)) is None
        queued = await asyncio.gather(*(batcher.submit(engine, _images(v)) for v in (5.0, 6.0, 7.0)))
        third = float((await asyncio.wrap_future(running))[0, 0])
        await batcher.stop()
        pool.shutdown()
        return fast, third, [float(q[0, 0]) for q in queued]

    fast, third, queued = asyncio.run(scenario())
    assert fast == [1.0, 2.0] and third == 3.0 and queued == [5.0, 6.0, 7.0]
    assert len(engine.threads) == 4  # three fast runs, then one batch of the three queued requests
    assert len(set(engine.threads)) == 1  # every session.run on the inference thread


def test_a_fast_run_cancelled_before_it_starts_frees_the_fast_path():
    engine = RecordingEngine()
    release = threading.Event()

    async def scenario():
        batcher = DynamicBatcher(max_batch_size=4)
        batcher.start()
        blocker = batcher._executor.submit(release.wait)  # the inference thread is taken, unbeknown to it
        running = batcher.run_now(engine, _images(1.0))
        assert running is not None and batcher.run_now(engine, _images(2.0)) is None  # one at a time
        assert running.cancel()  # a request timeout, before the run began
        assert batcher.run_now(engine, _images(3.0)) is not None  # the fast path is free again
        release.set()
        blocker.result(timeout=5)
        await batcher.stop()

    asyncio.run(scenario())


def test_a_lone_request_waits_for_the_ones_on_their_way():
    """Requests still being decoded (``Arrivals``) keep the fast path shut, and a lone queued request waits
    (up to the queue delay) for them to share its batch; with none on its way it runs at once."""
    from vit_consumer.batching import Arrivals

    engine = RecordingEngine()

    async def scenario():
        arrivals = Arrivals()
        batcher = DynamicBatcher(max_batch_size=8, max_queue_delay_ms=500, coming=arrivals)
        batcher.start()
        leave = arrivals.enter()  # one request is being decoded
        assert batcher.run_now(engine, _images(1.0)) is None  # no batch of one ahead of it
        mine = arrivals.enter()
        assert batcher.run_now(engine, _images(1.0), counted=1) is None  # the caller's own count aside
        mine()
        mine()  # leaving twice counts once
        assert arrivals() == 1
        first = asyncio.ensure_future(batcher.submit(engine, _images(1.0)))
        await asyncio.sleep(0.05)  # the batcher holds the lone request: another is on its way
        assert not engine.threads
        second = asyncio.ensure_future(batcher.submit(engine, _images(2.0), on_queued=leave))
        results = await asyncio.gather(first, second)
        assert len(engine.threads) == 1  # one batch for both
        started = time.perf_counter()
        await batcher.submit(engine, _images(3.0))  # nothing on its way: no wait
        waited = time.perf_counter() - started
        await batcher.stop()
        return [float(r[0, 0]) for r in results], waited, arrivals()

    values, waited, left = asyncio.run(scenario())
    assert values == [1.0, 2.0] and waited < 0.4 and left == 0
