"""A turn answered on speculation, from the first pause in the user's speech (app/core/answering.py).

It runs as usual, but behind a closed Gate, so nothing of it is sent, shown or remembered. If the turn
then ends with exactly that audio, the queue adopts the running answer and opens its gate; if the user
goes on speaking, it is cancelled (its worker jobs with it) and leaves no trace.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.core.metrics import Metrics
from app.core.pending import PendingTurn
from app.core.reply import Reply


class Gate:
    """A turn's way out to the conversation (events, state, playback clock): open, or closed while
    the turn is a guess, holding what it would have done until open() or discard()."""

    def __init__(self, *, closed: bool = False) -> None:
        self._held: list[Callable[[], None]] | None = [] if closed else None
        self._verdict: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not closed:
            self._verdict.set_result(True)

    def do(self, fn: Callable[..., object], *args: object) -> None:
        if self._held is None:
            fn(*args)
        elif not self._verdict.done():
            self._held.append(functools.partial(fn, *args))

    def open(self) -> None:
        held, self._held = self._held or [], None
        self._verdict.set_result(True)
        for action in held:
            action()

    def discard(self) -> None:
        self._held = []
        if not self._verdict.done():
            self._verdict.set_result(False)

    async def confirmed(self) -> bool:
        """True once open (at once if it never was closed); False if the guess was discarded."""
        return await asyncio.shield(self._verdict)


@dataclass
class Guess:
    """A turn answered on speculation: its task runs behind its closed gate."""

    turn: PendingTurn
    reply: Reply
    gate: Gate
    task: asyncio.Task[None]


class Guesses:
    """The one guess a conversation may have running, and what becomes of it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._guess: Guess | None = None

    def hold(self, guess: Guess) -> None:
        """Keep `guess` as the running one (the caller has dropped any earlier guess first)."""
        assert self._guess is None, "a second guess while one runs"
        self._guess = guess

    def drop(self) -> None:
        """The user went on speaking: the guess was wrong."""
        if (guess := self._guess) is not None:
            self._guess = None
            guess.gate.discard()
            guess.task.cancel()
            self._metrics.speculations.labels("dropped").inc()

    def adopt(self, turn: PendingTurn) -> Guess | None:
        """The running guess, if it answers exactly this turn's audio (else it is dropped)."""
        guess = self._guess
        if (guess is None or guess.task.done() or guess.turn.id != turn.id or turn.audio is None
                or guess.turn.audio is None or not np.array_equal(guess.turn.audio, turn.audio)
                or guess.turn.answer != turn.answer):
            self.drop()
            return None
        self._guess = None
        self._metrics.speculations.labels("used").inc()
        guess.turn.t_speech_end, guess.turn.t_decided = turn.t_speech_end, turn.t_decided
        guess.reply.marks["end_of_turn"] = turn.t_decided
        if "first_audio" in guess.reply.marks:  # made while held: the page gets it from now on
            guess.reply.marks["first_audio"] = time.perf_counter()
        return guess
