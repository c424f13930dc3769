"""Engine worker threads: results, streaming, errors and cancellation cross into asyncio."""

import asyncio
import threading
import time

import numpy as np
import pytest

from app.engines.workers import Worker


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


async def hold(worker: Worker) -> tuple[asyncio.Future, threading.Event]:
    """Another session's long job holds `worker` until the event is set; returns (its future, the event)."""
    started, release = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        release.wait(10)

    blocker = asyncio.ensure_future(worker.run(busy))
    await asyncio.to_thread(started.wait, 10)
    return blocker, release


def test_a_queued_stream_whose_consumer_left_never_starts():
    calls = []

    def tokens(cancel):
        calls.append("started")  # a real engine would start its work here
        yield "tok"

    async def main():
        loop = asyncio.get_running_loop()
        unhandled = []
        loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
        worker = Worker("engine")
        blocker, release = await hold(worker)

        async def consume():
            async for _ in worker.stream(tokens):
                pass

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)  # one loop step: the consumer hands its job over and waits
        consumer.cancel()  # e.g. its client disconnected
        await asyncio.gather(consumer, return_exceptions=True)
        release.set()
        await blocker
        assert await worker.run(lambda: 42) == 42  # runs after the queued job's turn
        worker.close()
        return unhandled

    assert asyncio.run(main()) == []
    assert calls == []


def test_a_job_that_fails_before_its_first_item_is_raised_to_the_consumer():
    def make(cancel):  # not a generator: it fails when called, on the worker thread
        raise RuntimeError("model not loaded")

    async def main():
        worker = Worker("t")
        with pytest.raises(RuntimeError, match="model not loaded"):
            async for _ in worker.stream(make):
                pass
        worker.close()

    asyncio.run(asyncio.wait_for(main(), timeout=10))  # a lost failure would leave it waiting forever


def test_a_queued_run_whose_caller_was_cancelled_never_calls_the_model():
    calls = []

    async def main():
        worker = Worker("engine")
        blocker, release = await hold(worker)
        caller = asyncio.ensure_future(worker.run(calls.append, "model called"))
        await asyncio.sleep(0)  # the job is in the executor's queue
        caller.cancel()  # its session went away
        await asyncio.gather(caller, return_exceptions=True)
        release.set()
        await blocker
        assert await worker.run(lambda: 42) == 42  # the queue has moved past the cancelled job
        worker.close()

    asyncio.run(main())
    assert calls == []


def test_a_job_cancelled_before_it_starts_never_makes_its_stream():
    from app.engines.workers import _produce

    made, handed = [], []
    cancel = threading.Event()
    cancel.set()  # set between the consumer leaving and the thread taking the job
    _produce(lambda c: made.append(c) or iter([1]), cancel, handed.append)
    assert made == [] and handed == []


@pytest.mark.parametrize(("held", "expected"), [("llm", []), ("tts", ["prompt", "slice"])])
def test_a_cancelled_reply_never_calls_the_models_for_its_queued_jobs(held, expected):
    """A reply cancelled while its jobs wait behind another session's: with the LLM held, its
    prompt job never runs; with the voice held, its phrase never reaches the TTS model."""
    from types import SimpleNamespace

    from app.core.chunking import ChunkSettings
    from app.core.pipeline import Writing, make_reply
    from app.core.reply import Reply
    from app.engines.llm import Prompt

    calls = []

    class CountingLlm:
        settings = SimpleNamespace(max_tokens=32, slice_tokens=8)

        def prompt(self, messages, tools=None):
            calls.append("prompt")
            return Prompt([], [])

        def count_tokens(self, text):
            return len(text.split())

        def stream_slice(self, prompt, so_far, **options):
            calls.append("slice")
            yield "Hello there. ", True

    class CountingTts:
        sample_rate = 16000

        def synthesize(self, phrase, voice=None, cancel=None):
            calls.append("tts")
            yield np.zeros(160, np.int16)

    async def main():
        llm_worker, tts_worker = Worker("llm"), Worker("tts")
        engines = SimpleNamespace(llm=CountingLlm(), tts=CountingTts(), llm_worker=llm_worker, tts_worker=tts_worker)
        started, release = threading.Event(), threading.Event()

        def busy():
            started.set()
            release.wait(10)

        blockers = [asyncio.ensure_future((llm_worker if held == "llm" else tts_worker).run(busy))]
        await asyncio.to_thread(started.wait, 10)
        reply = asyncio.ensure_future(make_reply(
            engines, [], Reply(16000), chunking=ChunkSettings(), writing=Writing(), voice=None,
            on_text=lambda piece: None, on_audio=lambda chunk, first: None,
        ))
        await asyncio.sleep(0.2)  # its next job waits in the held worker's queue
        reply.cancel()
        await asyncio.gather(reply, return_exceptions=True)
        release.set()
        await asyncio.gather(*blockers)
        for worker in (llm_worker, tts_worker):
            await worker.run(lambda: None)  # every queued job has had its turn
            worker.close()

    asyncio.run(main())
    assert calls == expected
