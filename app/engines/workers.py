"""One worker thread per engine, so that blocking model calls never run on the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class Worker:
    """Runs jobs for one engine, one at a time, in the order they were submitted; or, with `threads`
    > 1, that many at once (an engine that batches them, such as CSM with `tts.csm.batch`)."""

    def __init__(self, name: str, threads: int = 1) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def stream(
        self, make: Callable[[threading.Event], Iterator[T]]
    ) -> AsyncIterator[T]:
        """Iterate `make(cancel)` on the worker thread, yielding its items here as they come.

        If the consumer stops early (break, exception, task cancelled), `cancel` is set so the
        generator on the thread stops at its next item instead of running to the end; a job
        still waiting in the queue then never starts (its session may be gone: nobody would
        get the result, and the next sessions would wait for it).
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def hand_over(item: Any) -> None:  # on the worker thread
            loop.call_soon_threadsafe(items.put_nowait, item)

        future = loop.run_in_executor(self._executor, _produce, make, cancel, hand_over)
        try:
            while (item := await items.get()) is not _DONE:
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            cancel.set()
            # Still queued: the executor drops it. Running: the thread notices `cancel` at its
            # next item; don't wait on it here.
            future.cancel()
            future.add_done_callback(_consume_outcome)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _produce(make: Callable[[threading.Event], Iterator[T]], cancel: threading.Event,
             hand_over: Callable[[Any], None]) -> None:
    """The worker thread's side of Worker.stream: each item, or the failure, then _DONE."""
    if cancel.is_set():  # the consumer left just as the thread took the job
        return
    iterator = None
    try:
        iterator = make(cancel)
        for item in iterator:
            hand_over(item)
            if cancel.is_set():
                break
    except BaseException as exc:  # handed to the consumer, raised there
        hand_over(_Failure(exc))
    finally:
        # Close here, on the engine's own thread: left to the garbage collector, a
        # generator's cleanup (e.g. llama.cpp's) could run on any thread.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    hand_over(_DONE)


def _consume_outcome(future: asyncio.Future[None]) -> None:
    # Fetch the outcome nobody awaits, so asyncio does not log it as never retrieved.
    if not future.cancelled():
        future.exception()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
