"""The conversation's turn queue: turns are answered one at a time, in order. Answering one means
transcribing it (if spoken), building the messages from the history, and running the reply pipeline
(app/pipeline.py); whatever happens, the turn ends with exactly one TurnEnd, its metrics, and the
history updated with what was heard.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import events as ev
from .pipeline import StageError, make_reply
from .reply import Reply

if TYPE_CHECKING:
    from .conversation import Conversation

log = logging.getLogger(__name__)


@dataclass
class PendingTurn:
    id: int
    t_speech_end: float  # perf_counter() when the user stopped speaking (or sent text)
    t_decided: float  # when the end of the turn was decided
    audio: np.ndarray | None = None
    text: str | None = None


class Answering:
    def __init__(self, conversation: Conversation) -> None:
        self._c = conversation
        self._queue: asyncio.Queue[PendingTurn] = asyncio.Queue()
        self._current: asyncio.Task[None] | None = None
        self._active: tuple[PendingTurn, Reply] | None = None  # the turn being answered
        self._cut: tuple[str, int | None] | None = None  # why the running turn was cancelled

    @property
    def busy(self) -> bool:
        return self._current is not None

    def add(self, turn: PendingTurn) -> None:
        """Queue `turn`; with max_queued_turns already waiting, the oldest of them is dropped
        (the newest message is the one the user means now)."""
        if self._queue.qsize() >= self._c.engines.settings.limits.max_queued_turns:
            dropped = self._queue.get_nowait()
            log.info("conversation %s: turn %d dropped, too many waiting", self._c.id, dropped.id)
            self._c.emit(ev.error("turn_dropped", dropped.id))
            self._c.emit(ev.TurnEnd(dropped.id, "interrupted"))
        self._queue.put_nowait(turn)

    def drop_queued(self) -> list[int]:
        """Take every turn still waiting out of the queue; returns their ids."""
        dropped = []
        while not self._queue.empty():
            dropped.append(self._queue.get_nowait().id)
        return dropped

    def cut_off(self, cause: str, played: int | None) -> tuple[PendingTurn, Reply] | None:
        """Cancel the turn being answered, if any (its TurnEnd follows); returns it and its reply."""
        if self._current is None or self._current.done() or self._active is None:
            return None
        self._cut = (cause, played)
        self._current.cancel()
        return self._active

    async def run(self) -> None:
        """Answer queued turns until cancelled."""
        try:
            while True:
                turn = await self._queue.get()
                self._cut = None
                self._active = (turn, Reply(self._c.engines.tts.sample_rate))
                self._current = asyncio.create_task(self._answer(*self._active))
                await asyncio.wait({self._current})  # an interrupt cancels only this turn
                self._current, self._active = None, None
                self._c.set_state(self._c.resting_state())
        finally:
            if self._current is not None:
                self._current.cancel()
                await asyncio.wait({self._current})  # its TurnEnd and metrics still count

    async def _answer(self, turn: PendingTurn, reply: Reply) -> None:
        reply.marks["end_of_turn"] = turn.t_decided
        reason, user_text = "completed", turn.text
        try:
            self._c.set_state("thinking")
            if user_text is None:
                user_text = await self._transcribe(turn.audio)
                reply.mark("transcript")
            if not user_text:
                reason = "no_speech"
                return
            self._c.emit(ev.Transcript(turn.id, user_text))
            await self._reply(turn.id, user_text, reply)
        except asyncio.CancelledError:
            reason = "interrupted"
        except StageError as exc:
            reason = "error"
            log.error("conversation %s turn %d: %s failed: %s", self._c.id, turn.id, exc.stage, exc,
                      exc_info=exc.__cause__)
            self._c.emit(ev.error(f"{exc.stage}_failed", turn.id))
        except Exception:
            reason = "error"
            log.exception("conversation %s turn %d failed", self._c.id, turn.id)
            self._c.emit(ev.error("internal_error", turn.id))
        finally:
            self._finish(turn, user_text, reply, reason)

    async def _transcribe(self, audio: np.ndarray | None) -> str:
        engines = self._c.engines
        try:
            return await engines.asr_worker.run(engines.asr.transcribe, audio)
        except Exception as exc:
            raise StageError("asr", exc) from exc

    async def _reply(self, turn_id: int, user_text: str, reply: Reply) -> None:
        """The options are read once here: a change sent meanwhile applies from the next reply."""
        c, (options, voice) = self._c, self._c.reply_options()
        messages = c.engines.llm.build_messages(c.memory.history, user_text, options.system_prompt)
        sample_rate = c.engines.tts.sample_rate

        def on_audio(chunk: np.ndarray, first: bool) -> None:
            if first:
                c.emit(ev.ReplyAudioStart(turn_id, sample_rate))
                c.set_state("speaking")
            c.emit(ev.ReplyAudio(turn_id, chunk, sample_rate))
            c.playback_end = reply.playback_end()

        await make_reply(
            c.engines, messages, reply, temperature=options.temperature, voice=voice,
            on_text=lambda piece: c.emit(ev.ReplyText(turn_id, piece)), on_audio=on_audio,
        )
        if not reply.phrases:
            raise StageError("llm", RuntimeError("it returned an empty reply"))

    def _finish(self, turn: PendingTurn, user_text: str | None, reply: Reply, reason: str) -> None:
        c = self._c
        if reply.samples:
            c.emit(ev.ReplyAudioEnd(turn.id, reply.samples))
        said = reply.spoken
        if reason == "interrupted":
            played = self._cut[1] if self._cut and self._cut[1] is not None else reply.played_estimate()
            said = reply.heard(played)
            c.metrics.barge_ins.inc()
        # A reset cut this turn off: it belongs to the conversation that was just forgotten.
        forgotten = self._cut is not None and self._cut[0] == "reset"
        c.memory.turn_ended(None if forgotten else user_text, said, reply, interrupted=reason == "interrupted")
        reply.mark("done")
        metrics = _metrics(turn, reply)
        c.metrics.observe_turn(metrics, reason)
        c.emit(metrics)
        c.emit(ev.TurnEnd(turn.id, reason, said))  # type: ignore[arg-type]
        log.info("conversation %s turn %d %s: voice-to-voice %s ms, total %s ms", c.id, turn.id,
                 reason, metrics.first_audio_ms, metrics.total_ms)


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
    )
