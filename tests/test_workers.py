"""Engine worker threads: results, streaming, errors and cancellation cross into asyncio."""

import asyncio
import threading
import time

import pytest

from app.workers import Worker


def test_run_executes_off_the_event_loop():
    async def main():
        worker = Worker("t")
        name = await worker.run(lambda: threading.current_thread().name)
        worker.close()
        return name, threading.current_thread().name

    on_worker, on_loop = asyncio.run(main())
    assert on_worker.startswith("t") and on_worker != on_loop


def test_stream_yields_items_and_raises_errors():
    def numbers(cancel):
        yield 1
        yield 2
        raise ValueError("model broke")

    async def main():
        worker = Worker("t")
        got = []
        with pytest.raises(ValueError, match="model broke"):
            async for x in worker.stream(numbers):
                got.append(x)
        worker.close()
        return got

    assert asyncio.run(main()) == [1, 2]


def test_stopping_the_consumer_cancels_the_producer():
    produced = []
    stopped = threading.Event()

    def endless(cancel):
        i = 0
        while not cancel.is_set():
            produced.append(i)
            yield i
            i += 1
            time.sleep(0.01)
        stopped.set()

    async def main():
        worker = Worker("t")
        async for x in worker.stream(endless):
            if x == 3:
                break
        await asyncio.to_thread(stopped.wait, 5)
        # The worker is free again for the next job.
        assert await worker.run(lambda: 42) == 42
        worker.close()

    asyncio.run(main())
    assert stopped.is_set()
    assert len(produced) < 10


def test_an_abandoned_generator_is_closed_on_the_worker_thread():
    closed_on = []

    def tokens(cancel):
        try:
            while True:
                yield "tok"
        finally:  # llama.cpp frees its generation state here; it must be the engine's thread
            closed_on.append(threading.current_thread().name)

    async def main():
        worker = Worker("engine")
        async for _ in worker.stream(tokens):
            break
        await worker.run(lambda: None)  # runs after the producer has finished
        worker.close()

    asyncio.run(main())
    assert len(closed_on) == 1 and closed_on[0].startswith("engine")
