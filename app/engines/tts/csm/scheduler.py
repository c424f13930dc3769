"""The thread that owns a CsmBatch: phrases from every session share its frame steps, fairly.

Callers `submit` a phrase and read its Job's queue. The thread admits waiting phrases round-robin by
session (one session's many phrases never starve another's), one live row per session at a time: a
session's next phrase is planned (its prompt built, with the voice memory) only after its previous
one ended and, on EOS, was remembered, exactly as the one-at-a-time path orders them. Each row gets a
Mimi streaming decoder of its own from a pool, held by the row (not the slot: rows move between
slots when the batch compacts). A failure on the thread ends every waiting and live job with it.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.engines.tts.csm.batch import CsmBatch
from app.engines.tts.csm.generator import GenerationConfig, Prompt


class MimiDecoder:
    """One Mimi kept in streaming mode for one row at a time; reset when a new row takes it."""

    def __init__(self, mimi: Any, frame_by_frame: bool) -> None:
        self.mimi, self.frame_by_frame = mimi, frame_by_frame

    def reset(self) -> None:
        if not self.mimi.is_streaming:
            self.mimi.streaming_forever(1)
        self.mimi.reset_streaming()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """(n, K) codes -> (n * 1920,) float32 PCM; see CsmGenerator.decode for the frame-by-frame case."""
        frames = codes.T.unsqueeze(0)
        if not self.frame_by_frame:
            return self.mimi.decode(frames)[0, 0].float().cpu().numpy()
        pcm = [self.mimi.decode(frames[:, :, i : i + 1]) for i in range(frames.shape[-1])]
        return torch.cat(pcm, dim=-1)[0, 0].float().cpu().numpy()


@dataclass(eq=False)
class Job:
    """One phrase: `plan` builds its prompt when admitted; its queue gets ("pcm", array, codes) items,
    then ("end", stop_reason, codes) or ("error", exception, None)."""

    session: Hashable
    plan: Callable[[], Prompt]
    config: GenerationConfig
    rng: torch.Generator
    cancel: threading.Event | None = None
    on_end: Callable[[str | None, torch.Tensor], None] | None = None  # on the thread, before the next phrase
    items: queue.Queue = field(default_factory=queue.Queue)
    first_frame: int | None = None  # the batch's frame count at its first and last chunk (for tests)
    last_frame: int | None = None
    stop_reason: str | None = None  # once ended, as BatchRow's
    codes: torch.Tensor | None = None


class BatchScheduler:
    """Runs a CsmBatch on its own thread for every session's phrases."""

    def __init__(self, batch: CsmBatch, decoders: list[Any]) -> None:
        self.batch, self.decoders = batch, list(decoders)
        self.lock = threading.Condition()
        self.waiting: OrderedDict[Hashable, deque[Job]] = OrderedDict()
        self.busy: set[Hashable] = set()  # sessions with a live row
        self.jobs: dict[int, tuple[Job, Any]] = {}  # id(row) -> its job and decoder
        self.frame, self.held, self.closed = 0, False, False
        self.calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self.thread = threading.Thread(target=self._loop, name="csm-batch", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        with self.lock:
            self.waiting.setdefault(job.session, deque()).append(job)
            self.lock.notify_all()
        return job

    def waiting_count(self) -> int:
        with self.lock:
            return sum(len(jobs) for jobs in self.waiting.values())

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the batch thread between frames and return its result (compiling and warming
        there: the thread then replays the CUDA graphs it recorded)."""
        future: Future = Future()
        with self.lock:
            self.calls.append((fn, future))
            self.lock.notify_all()
        return future.result()

    def hold(self, held: bool) -> None:
        """Pause admitting and stepping (tests line phrases up so that they join together)."""
        with self.lock:
            self.held = held
            self.lock.notify_all()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def _ready(self) -> bool:
        if self.closed or self.calls:
            return True
        return not self.held and (bool(self.batch.live()) or self._admissible() is not None)

    def _admissible(self) -> Hashable | None:
        """The first session, in round-robin order, with a phrase waiting and no live row."""
        return next((s for s in self.waiting if s not in self.busy), None) if self.batch.free_slots() else None

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # for this thread only: inference, and Mimi's outputs go to numpy
        while True:
            with self.lock:
                self.lock.wait_for(self._ready)
                if self.closed:
                    return
                held, calls = self.held, list(self.calls)
                admitted = [] if held else self._take()
                self.calls.clear()
            for fn, future in calls:
                _settle(fn, future)
            if held:
                continue
            try:
                for job in admitted:
                    self._join(job)
                if self.batch.live():
                    self._advance()
            except BaseException as exc:  # every consumer's reply ends with it (tts_failed)
                self._fail_all(exc)

    def _take(self) -> list[Job]:
        """Up to the free slots' worth of jobs, one per session, round-robin (under the lock)."""
        taken: list[Job] = []
        while len(taken) < self.batch.free_slots() and (session := self._admissible()) is not None:
            jobs = self.waiting.pop(session)
            taken.append(jobs.popleft())
            if jobs:
                self.waiting[session] = jobs  # to the back of the round
            self.busy.add(session)
        return taken

    def _join(self, job: Job) -> None:
        if job.cancel is not None and job.cancel.is_set():
            self._end(job, "cancelled", torch.zeros(0, dtype=torch.long))
            return
        try:
            prompt = job.plan()
            row = self.batch.join(prompt, job.config, rng=job.rng, cancel=job.cancel)
        except Exception as exc:  # this phrase only: the batch is untouched
            self._end(job, None, None, error=exc)
            return
        decoder = self.decoders.pop()
        decoder.reset()
        self.jobs[id(row)] = (job, decoder)

    def _advance(self) -> None:
        live = set(map(id, self.batch.live()))
        closed = self.batch.advance()
        self.frame += 1
        for row, codes in closed:
            job, decoder = self.jobs[id(row)]
            if codes.shape[0]:
                job.first_frame = self.frame if job.first_frame is None else job.first_frame
                job.last_frame = self.frame
                job.items.put(("pcm", decoder.decode(codes.to(self.batch.device)), codes))
        ended = {id(row): row for row, _ in closed}
        for key in live - set(map(id, self.batch.live())):  # rows that left: stopped, or cancelled
            job, decoder = self.jobs.pop(key)
            self.decoders.append(decoder)
            row = ended.get(key)
            self._end(job, row.stop_reason if row else "cancelled", row.codes if row else None)

    def _end(self, job: Job, reason: str | None, codes: torch.Tensor | None, error: BaseException | None = None):
        job.stop_reason, job.codes = reason, codes
        try:
            if error is None and job.on_end is not None and codes is not None:
                job.on_end(reason, codes)
        finally:
            job.items.put(("error", error, None) if error is not None else ("end", reason, codes))
            with self.lock:
                self.busy.discard(job.session)
                self.lock.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        """End every live and waiting job with `exc`; the batch starts again empty."""
        with self.lock:
            waiting = [job for jobs in self.waiting.values() for job in jobs]
            self.waiting.clear()
        for row in self.batch.live():
            row.stop_reason = "failed"
            self.batch._leave(row)
        for job, decoder in self.jobs.values():
            self.decoders.append(decoder)
            waiting.append(job)
        self.jobs.clear()
        for job in waiting:
            self._end(job, None, None, error=exc)


def _settle(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # raised in the caller
        future.set_exception(exc)
