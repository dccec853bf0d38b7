"""The dynamic batcher on its own: one inference thread, batches of what is queued, waits only for arrivals."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from vit_consumer.batching import Arrivals, BatcherStopped, DynamicBatcher, QueueFull


class RecordingEngine:
    """Logits = the images' first pixel; remembers each call's thread and batch size; ``gate`` holds a run."""

    def __init__(self, seconds: float = 0.0, gate: threading.Event | None = None):
        self.threads: list[int] = []
        self.sizes: list[int] = []
        self.seconds = seconds
        self.gate = gate
        self.entered = threading.Event()

    def run(self, images: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        self.sizes.append(len(images))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        time.sleep(self.seconds)
        return images[:, 0, 0, :1].copy()


def _images(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 3), value, np.float32)


def _values(futures) -> list[float]:
    return [float(f.result(timeout=10)[0, 0]) for f in futures]


@pytest.fixture
def batcher_of():
    made = []

    def make(**kwargs) -> DynamicBatcher:
        batcher = DynamicBatcher(**kwargs)
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for b in made:
        b.stop()


def test_queued_requests_share_one_batch_on_the_inference_thread_with_their_own_rows(batcher_of):
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = batcher_of(max_batch_size=8, max_queue_delay_ms=5)
    first = batcher.put(engine, _images(1.0))
    assert engine.entered.wait(5)  # it ran alone at once: nothing else was queued or on its way
    with ThreadPoolExecutor(3) as pool:  # like the service's decode threads
        queued = list(pool.map(lambda v: batcher.put(engine, _images(v, 2)), (5.0, 6.0, 7.0)))
    assert batcher.depth() == 3
    gate.set()
    assert _values([first]) == [1.0] and _values(queued) == [5.0, 6.0, 7.0]
    assert [q.result()[:, 0].tolist() for q in queued] == [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]
    assert engine.sizes == [1, 6]  # then one batch of the three queued requests
    assert len(set(engine.threads)) == 1 and engine.threads[0] != threading.get_ident()


class StreamsEngine(RecordingEngine):
    """An engine with streams: ``run`` on one stream, ``run_alone`` on every core (counted)."""

    alone = 0

    def run_alone(self, images):
        self.alone += 1
        return super().run(images)


def test_an_engine_that_runs_two_requests_at_once_gets_two_batches_at_once(batcher_of):
    """OpenVINO's streams: while one batch runs, the next forms and runs on a second inference thread."""
    gate = threading.Event()
    held, engine = StreamsEngine(gate=gate), StreamsEngine()
    # Always something on its way (a busy service): no batch has the machine to itself.
    batcher = batcher_of(max_batch_size=8, max_queue_delay_ms=0, workers=2, coming=lambda: 1)
    first = batcher.put(held, _images(5.0))
    assert held.entered.wait(5)
    assert _values([batcher.put(engine, _images(1.0))]) == [1.0]  # answered while the first still runs
    assert not first.done() and (held.alone, engine.alone) == (0, 0)  # each on its stream
    gate.set()
    assert _values([first]) == [5.0]
    assert len(set(held.threads + engine.threads)) == 2  # two inference threads
    with pytest.raises(ValueError, match="workers >= 1"):
        DynamicBatcher(workers=0)


def test_a_batch_alone_runs_on_every_core_and_no_other_starts_beside_it(batcher_of):
    """A lone batch (its request came to an idle service; nothing else formed, queued or on its way) runs
    with ``run_alone``; a stream started beside it would share its cores, so the next batch waits for it to
    end, and then runs on a stream."""
    gate = threading.Event()
    held, engine = StreamsEngine(gate=gate), StreamsEngine()
    batcher = batcher_of(max_batch_size=8, max_queue_delay_ms=0, workers=2)
    first = batcher.put(held, _images(5.0))
    assert held.entered.wait(5) and held.alone == 1
    second = batcher.put(engine, _images(1.0))
    time.sleep(0.3)
    assert not second.done() and not engine.entered.is_set()  # waits for the lone batch
    gate.set()
    assert _values([first, second]) == [5.0, 1.0]
    assert engine.alone == 0  # it came to a busy service: on a stream (else one batch at a time for ever)
    assert _values([batcher.put(engine, _images(3.0))]) == [3.0] and engine.alone == 1  # idle again: alone
    one = batcher_of(max_batch_size=8, max_queue_delay_ms=0)  # one thread: the engine's plain run
    assert _values([one.put(engine, _images(2.0))]) == [2.0] and engine.alone == 1


def test_the_inference_threads_follow_the_engine_served_now(batcher_of):
    """A reload may bring an engine that runs more (or fewer) requests at once: ``set_workers``."""

    def two_at_once(batcher) -> bool:  # is a second batch answered while a first one is held?
        gate = threading.Event()
        held = StreamsEngine(gate=gate)
        first = batcher.put(held, _images(5.0))
        assert held.entered.wait(5)
        second = batcher.put(StreamsEngine(), _images(1.0))
        time.sleep(0.3)
        answered = second.done()
        gate.set()
        assert _values([first, second]) == [5.0, 1.0]
        return answered

    batcher = batcher_of(max_batch_size=8, max_queue_delay_ms=0, coming=lambda: 1)  # a busy service
    assert not two_at_once(batcher)
    batcher.set_workers(2)
    assert two_at_once(batcher)
    batcher.set_workers(1)
    assert not two_at_once(batcher)
    batcher.set_workers(2)  # the index that ended starts again
    assert two_at_once(batcher)
    with pytest.raises(ValueError, match="workers >= 1"):
        batcher.set_workers(0)


def test_a_batch_never_exceeds_max_batch_size_nor_mixes_engines(batcher_of):
    gate = threading.Event()
    old, new = RecordingEngine(gate=gate), RecordingEngine()
    batcher = batcher_of(max_batch_size=4)
    blocker = batcher.put(old, _images(0.0))
    assert old.entered.wait(5)
    futures = [batcher.put(old, _images(1.0, 3)), batcher.put(old, _images(2.0, 2)), batcher.put(new, _images(3.0)),
               batcher.put(old, _images(4.0))]  # fmt: skip
    gate.set()
    assert _values([blocker, *futures]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert old.sizes == [1, 3, 2, 1] and new.sizes == [1]  # 3+2 > 4; a new version starts its own batch


def test_a_request_cancelled_before_its_batch_is_not_run(batcher_of):
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = batcher_of(max_batch_size=8)
    busy = batcher.put(engine, _images(1.0))
    assert engine.entered.wait(5)
    dropped, kept = batcher.put(engine, _images(2.0)), batcher.put(engine, _images(3.0))
    assert dropped.cancel()  # a request timeout, while it was queued
    gate.set()
    assert _values([busy, kept]) == [1.0, 3.0] and engine.sizes == [1, 1]


def test_a_batch_waits_only_for_requests_on_their_way(batcher_of):
    """With company but nothing on its way a batch runs at once, even with a long queue delay; a lone
    request waits (up to the delay) for one on its way, and is released when that one fails instead."""
    engine = RecordingEngine()
    arrivals = Arrivals()
    batcher = batcher_of(max_batch_size=8, max_queue_delay_ms=5000, coming=arrivals)
    arrivals.on_leave = batcher.nudge
    started = time.perf_counter()
    assert _values([batcher.put(engine, _images(1.0))]) == [1.0]  # nothing on its way: no wait
    assert time.perf_counter() - started < 2.5

    leave = arrivals.enter()  # one being decoded
    first = batcher.put(engine, _images(2.0))
    time.sleep(0.1)
    assert not first.done()  # held for the one on its way
    second = batcher.put(engine, _images(3.0), arrived=leave)
    assert _values([first, second]) == [2.0, 3.0] and engine.sizes == [1, 2] and arrivals() == 0

    failing = arrivals.enter()
    started = time.perf_counter()
    lone = batcher.put(engine, _images(4.0))
    time.sleep(0.1)
    failing()  # its decode failed: the lone request need not wait out the 5 s
    assert _values([lone]) == [4.0] and time.perf_counter() - started < 2.5
    failing()  # leaving twice counts once
    assert arrivals() == 0

    gate = threading.Event()
    held = RecordingEngine(gate=gate)
    busy = batcher.put(held, _images(5.0))
    assert held.entered.wait(5)
    pair = [batcher.put(held, _images(6.0)), batcher.put(held, _images(7.0))]
    started = time.perf_counter()
    gate.set()  # two queued, none on its way: their batch runs at once, not after the 5 s delay
    assert _values([busy, *pair]) == [5.0, 6.0, 7.0] and held.sizes == [1, 2]
    assert time.perf_counter() - started < 2.5


def test_queue_bound_engine_failure_and_stop(batcher_of):
    gate = threading.Event()
    engine = RecordingEngine(gate=gate)
    batcher = batcher_of(max_batch_size=1, max_queue=2)
    busy = batcher.put(engine, _images(1.0))
    assert engine.entered.wait(5)
    waiting = [batcher.put(engine, _images(2.0)), batcher.put(engine, _images(3.0))]
    with pytest.raises(QueueFull):
        batcher.put(engine, _images(4.0))

    class Broken:
        def run(self, images):
            raise RuntimeError("engine broke")

    gate.set()
    assert _values([busy, *waiting]) == [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match="engine broke"):
        batcher.put(Broken(), _images(5.0)).result(timeout=5)
    assert _values([batcher.put(engine, _images(6.0))]) == [6.0]  # the service goes on

    gate.clear()
    engine.entered.clear()
    busy = batcher.put(engine, _images(7.0))
    assert engine.entered.wait(5)
    queued = batcher.put(engine, _images(8.0))
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.05)
    with pytest.raises(BatcherStopped):
        queued.result(timeout=5)  # queued, not run: failed at once
    with pytest.raises(BatcherStopped):
        batcher.put(engine, _images(9.0))
    gate.set()
    stopper.join(10)
    assert _values([busy]) == [7.0]  # the batch that was running finished


def _service():
    from vit_consumer.server import Service
    from vit_consumer.settings import Settings

    # The engine comes with each request; the service's own only sizes the batcher and owns no files.
    one_at_a_time = SimpleNamespace(runtime=SimpleNamespace(parallel=1), discard_files=lambda: None)
    return Service(classifier=one_at_a_time, settings=Settings(max_batch_size=8))


def test_a_request_that_times_out_while_decoding_is_not_run():
    """Its client has had its 504: the engine's time goes to the others, and it is no longer on its way."""
    engine, service = RecordingEngine(), _service()
    service.batcher.start()
    decoding, release = threading.Event(), threading.Event()

    def slow_parse():
        decoding.set()
        assert release.wait(10)
        return _images(1.0)

    async def scenario():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(service._infer(engine, slow_parse), 0.2)
        assert decoding.is_set()  # the timeout came during the decode, not before it
        release.set()
        answer = await asyncio.wait_for(service._infer(engine, lambda: _images(2.0)), 10)
        await service.stop()
        return float(answer[0, 0])

    assert asyncio.run(scenario()) == 2.0
    assert engine.sizes == [1] and service.arrivals() == 0  # only the second request ran


def test_decode_failures_and_a_stopping_service_answer_at_once():
    engine, service = RecordingEngine(), _service()
    service.batcher.start()

    def bad_parse():
        raise ValueError("not an image")

    async def scenario():
        with pytest.raises(ValueError, match="not an image"):
            await asyncio.wait_for(service._infer(engine, bad_parse), 10)
        with pytest.raises(RuntimeError, match="StopIteration"):  # an asyncio future refuses StopIteration
            await asyncio.wait_for(service._infer(engine, lambda: next(iter(()))), 10)
        await service.stop()
        with pytest.raises(BatcherStopped):
            await asyncio.wait_for(service._infer(engine, lambda: _images(1.0)), 10)

    asyncio.run(scenario())
    assert engine.sizes == [] and service.arrivals() == 0 and not service.ready
