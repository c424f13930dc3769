"""The conversation's turn queue: turns are answered one at a time, in order. Answering one means
transcribing it (if spoken), building the messages from the history, and running the reply pipeline
(app/core/pipeline.py); whatever happens, the turn ends with exactly one TurnEnd, its metrics, and the
history updated with what was heard. A turn may also be answered on speculation, behind a closed gate
(app/core/speculation.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import numpy as np

from app.core import events as ev
from app.core.chunking import ChunkSettings
from app.core.echo import EchoGuard
from app.core.memory import Memory
from app.core.metrics import Metrics
from app.core.pending import PendingTurn
from app.core.pipeline import StageError, Writing, make_reply
from app.core.reply import Reply
from app.core.speculation import Gate, Guess, Guesses
from app.engines.llm import Message
from app.engines.loaded import Engines
from app.engines.tools import CallDelta

log = logging.getLogger(__name__)


class Conversational(Protocol):
    """What a turn does to the conversation it belongs to (app/core/conversation.py is one)."""

    id: str
    engines: Engines
    memory: Memory
    metrics: Metrics
    playback_end: float  # perf_counter() when the listener will have played all reply audio
    defaults: ev.ReplyRequest  # how a turn's reply is made where the turn does not say

    def emit(self, event: ev.Event) -> None: ...

    def set_state(self, state: ev.State) -> None: ...

    def resting_state(self) -> ev.State: ...

    def reply_options(self) -> tuple[ev.Options, object | None]: ...


class Answering:
    def __init__(self, conversation: Conversational, *, max_queued: int, chunking: ChunkSettings,
                 echo: EchoGuard) -> None:
        self._c = conversation
        self.echo = echo  # the reply audio as it plays, for the listener to tell its echo from the user
        self._max_queued = max_queued  # limits.max_queued_turns
        self._chunking = chunking
        self._queue: asyncio.Queue[PendingTurn] = asyncio.Queue()
        self._current: asyncio.Task[None] | None = None
        self._active: tuple[PendingTurn, Reply] | None = None  # the turn being answered
        self._cut: tuple[str, int | None] | None = None  # why the running turn was cancelled
        self.guesses = Guesses(conversation.metrics)

    @property
    def busy(self) -> bool:
        return self._current is not None

    def add(self, turn: PendingTurn) -> None:
        """Queue `turn`; with max_queued_turns already waiting, the oldest of them is dropped
        (the newest message is the one the user means now)."""
        if self._queue.qsize() >= self._max_queued:
            dropped = self._queue.get_nowait()
            log.info("conversation %s: turn %d dropped, too many waiting", self._c.id, dropped.id)
            self._c.emit(ev.error("turn_dropped", dropped.id))
            self._c.emit(ev.TurnEnd(dropped.id, "interrupted"))
        self._queue.put_nowait(turn)

    def speculate(self, turn: PendingTurn) -> None:
        """Start answering `turn`, the user's speech up to a pause, before the turn is certain to be
        over; only when nothing else is being answered or waiting (its answer would wait anyway)."""
        self.guesses.drop()
        if self.busy or not self._queue.empty():
            turn.words_judged(None)
            return
        gate, reply = Gate(closed=True), Reply(self._c.engines.tts.sample_rate)
        self.guesses.hold(Guess(turn, reply, gate, asyncio.create_task(self._answer(turn, reply, gate))))

    def drop_queued(self) -> list[int]:
        """Take every turn still waiting out of the queue; returns their ids."""
        dropped = []
        while not self._queue.empty():
            dropped.append(self._queue.get_nowait().id)
        return dropped

    @property
    def active(self) -> tuple[PendingTurn, Reply] | None:
        """The turn being answered and its reply, while it runs."""
        return None if self._current is None or self._current.done() else self._active

    def cut_off(self, cause: str, played: int | None) -> tuple[PendingTurn, Reply] | None:
        """Cancel the turn being answered, if any (its TurnEnd follows); returns it and its reply. A
        second cut before it ends (the page's interrupt after the server's own) keeps the first cause
        and adds what the page says it played."""
        if self._current is None or self._current.done() or self._active is None:
            return None
        if self._cut is not None and cause != "reset":  # a reset forgets the turn, whatever cut it
            cause, played = self._cut[0], self._cut[1] if played is None else played
        self._cut = (cause, played)
        self._current.cancel()
        return self._active

    async def run(self) -> None:
        """Answer queued turns until cancelled."""
        try:
            while True:
                turn = await self._queue.get()
                self._cut = None
                if (guess := self.guesses.adopt(turn)) is not None:
                    self._active, self._current = (guess.turn, guess.reply), guess.task
                    guess.gate.open()
                else:
                    self._active = (turn, Reply(self._c.engines.tts.sample_rate))
                    self._current = asyncio.create_task(self._answer(*self._active, Gate()))
                await asyncio.wait({self._current})  # an interrupt cancels only this turn
                self._ended_unstarted()
                self._current, self._active = None, None
                self._c.set_state(self._c.resting_state())
        finally:
            self.guesses.drop()
            if self._current is not None:
                self._current.cancel()
                await asyncio.wait({self._current})  # its TurnEnd and metrics still count
                self._ended_unstarted()

    def _ended_unstarted(self) -> None:
        """A task cancelled before its first step never runs its body, `finally` included: a turn
        cut off that early still ends, here (_answer marks end_of_turn first thing)."""
        if self._active is not None and "end_of_turn" not in self._active[1].marks:
            turn, reply = self._active
            self._finish(turn, turn.text, reply, "interrupted")

    async def _answer(self, turn: PendingTurn, reply: Reply, gate: Gate) -> None:
        c = self._c
        reply.marks["end_of_turn"] = turn.t_decided
        turn.request = turn.request or c.defaults  # read once: a change meanwhile applies to the next turn
        reason, user_text = "completed", turn.text
        try:
            gate.do(c.set_state, "thinking")
            if user_text is None and turn.audio is not None:
                user_text = await self._transcribe(turn.audio)
                reply.mark("transcript")
            if turn.has_words and not user_text:
                reason = "no_speech"
                return
            if user_text:
                gate.do(c.emit, ev.Transcript(turn.id, user_text))
            if turn.answer:
                await self._reply(turn, user_text, reply, gate)
            else:  # nothing said: the history keeps nothing of it
                reason = "not_answered"
                await _judge_only(c, turn, user_text or "")
        except asyncio.CancelledError:
            reason = "interrupted"
        except StageError as exc:
            reason = "error"
            log.error("conversation %s turn %d: %s failed: %s", c.id, turn.id, exc.stage, exc,
                      exc_info=exc.__cause__)
            gate.do(c.emit, ev.error(f"{exc.stage}_failed", turn.id))
        except Exception:
            reason = "error"
            log.exception("conversation %s turn %d failed", c.id, turn.id)
            gate.do(c.emit, ev.error("internal_error", turn.id))
        finally:
            turn.words_judged(None)  # the listener must not wait for words that will not come
            # A guess ends only once it is confirmed; a discarded one leaves no trace (its task is
            # cancelled while it waits here).
            if await gate.confirmed():
                self._finish(turn, user_text, reply, reason)

    async def _transcribe(self, audio: np.ndarray | None) -> str:
        engines = self._c.engines
        try:
            return await engines.asr_worker.run(engines.asr.transcribe, audio)
        except Exception as exc:
            raise StageError("asr", exc) from exc

    async def _reply(self, turn: PendingTurn, user_text: str | None, reply: Reply, gate: Gate) -> None:
        """The options are read once here: a change sent meanwhile applies from the next reply."""
        c, (options, voice) = self._c, self._c.reply_options()
        request = turn.request or c.defaults
        await c.memory.settled()
        messages = _messages(c, request, user_text, options)
        writing = Writing(options.temperature, request.tools, request.max_tokens)
        sample_rate = c.engines.tts.sample_rate
        # The words are judged beside the reply, as soon as they are known: the end of the turn waits for
        # the verdict (app/core/end_rule.py), and the judge's one thread costs the reply little.
        judging = asyncio.ensure_future(_judge_words(c, turn, messages)) if turn.on_words is not None else None

        def wrote(piece: str) -> None:
            gate.do(c.emit, ev.ReplyText(turn.id, piece))

        def called(call: CallDelta) -> None:
            gate.do(c.emit, ev.ReplyCall(turn.id, call))

        def sent(chunk: np.ndarray, first: bool) -> None:
            if first:
                c.emit(ev.ReplyAudioStart(turn.id, sample_rate))
                c.set_state("speaking")
            c.emit(ev.ReplyAudio(turn.id, chunk, sample_rate))
            c.playback_end = reply.playback_end()
            self.echo.played(chunk, sample_rate, c.playback_end - len(chunk) / sample_rate)

        try:
            await make_reply(
                c.engines, messages, reply, chunking=self._chunking, writing=writing, voice=voice,
                on_text=wrote, on_call=called, confirmed=gate.confirmed,
                on_audio=(lambda chunk, first: gate.do(sent, chunk, first)) if request.voice else None,
            )
            if judging is not None:
                await judging  # a short reply is written before its turn is confirmed
        finally:
            if judging is not None:
                judging.cancel()
        if not reply.phrases and not reply.calls:
            raise StageError("llm", RuntimeError("it returned an empty reply"))

    def _finish(self, turn: PendingTurn, user_text: str | None, reply: Reply, reason: str) -> None:
        c = self._c
        if reply.samples:
            c.emit(ev.ReplyAudioEnd(turn.id, reply.samples))
        request = turn.request or c.defaults
        said = _said(request, reply, reason, self._cut)
        if reason == "interrupted" and request.voice:
            c.metrics.barge_ins.inc()
        # A reset cut this turn off: it belongs to the conversation that was just forgotten. Or the user
        # went on talking (its said is then ""): their next turn holds this one's speech too.
        forgotten = self._cut is not None and self._cut[0] in ("reset", "continued")
        if request.remembered:
            c.memory.turn_ended(None if forgotten else user_text, said, reply, interrupted=reason == "interrupted",
                                audio=turn.audio)
        reply.mark("done")
        metrics = _metrics(turn, reply)
        c.metrics.observe_turn(metrics, reason)
        c.emit(metrics)
        c.emit(ev.TurnEnd(turn.id, reason, said))  # type: ignore[arg-type]
        log.info("conversation %s turn %d %s: voice-to-voice %s ms, total %s ms", c.id, turn.id,
                 reason, metrics.first_audio_ms, metrics.total_ms)


def _messages(c: Conversational, request: ev.ReplyRequest, user_text: str | None,
              options: ev.Options) -> list[Message]:
    """What the model reads: the request's own context or the conversation's history, then the user's words."""
    history = c.memory.messages() if request.context is None else list(request.context)
    system = request.instructions or options.system_prompt
    return c.engines.llm.build_messages(history, user_text, system, request.tools)


def _said(request: ev.ReplyRequest, reply: Reply, reason: str, cut: tuple[str, int | None] | None) -> str:
    """What the user got of the reply: all of it; text as far as it was sent; voice as far as it was heard
    when cut off; nothing when they went on talking (their next turn holds this one's speech too)."""
    if cut is not None and cut[0] == "continued":
        return ""
    if not request.voice:
        return reply.text.strip()
    if reason == "interrupted":
        return reply.heard(cut[1] if cut and cut[1] is not None else reply.played_estimate())
    return reply.spoken


async def _judge_only(c: Conversational, turn: PendingTurn, user_text: str) -> None:
    """A turn that is not answered: its words still help decide where it ends (app/core/end_rule.py)."""
    if turn.on_words is not None:
        options, _ = c.reply_options()
        messages = c.engines.llm.build_messages(list(c.memory.messages()), user_text, options.system_prompt)
        await _judge_words(c, turn, messages)


async def _judge_words(c: Conversational, turn: PendingTurn, messages: list[Message]) -> None:
    """The language model's probability that the user's message is complete, to the turn's guess
    (None if it cannot say: a model on a server, or a failure; then the sound alone decides)."""
    judge = getattr(c.engines.llm, "end_of_turn_probability", None)
    probability = None
    if judge is not None:
        try:
            probability = await c.engines.judge_worker.run(judge, messages)
        except Exception:
            log.warning("conversation %s: end-of-turn check by the LLM failed", c.id, exc_info=True)
    turn.words_judged(probability)


def _metrics(turn: PendingTurn, reply: Reply) -> ev.TurnMetrics:
    def ms(name: str) -> float | None:
        t = reply.marks.get(name)
        return None if t is None else round((t - turn.t_speech_end) * 1000, 1)

    return ev.TurnMetrics(
        turn.id,
        end_of_turn_ms=ms("end_of_turn"),
        transcript_ms=ms("transcript"),
        first_token_ms=ms("first_token"),
        first_phrase_ms=ms("first_phrase"),
        first_audio_ms=ms("first_audio"),
        total_ms=ms("done"),
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
    )
