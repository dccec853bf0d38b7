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
