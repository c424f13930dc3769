"""The conversation core: one person's conversation with the assistant, knowing no wire protocol.

Inputs are plain calls (configure, listen -> Listener.feed(pcm), say(text), interrupt(played),
reset); outputs are typed events (app/core/events.py) in order from next_event(). Follow a turn: the
Listener (app/core/listening.py) finds it in the PCM and calls speech_turn(); the turn queue
(app/core/answering.py) transcribes it, builds the messages from the history and runs the reply pipeline
(app/core/pipeline.py), whose text and audio come back here as events, and always ends it with a
TurnEnd. Speech that starts while the assistant thinks or talks cuts the reply off (barge-in); the
history keeps only what was heard (app/core/memory.py). At a pause in the user's speech the turn is
answered on speculation, unseen until the turn is confirmed (paused(), resumed()).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import numpy as np

from app.audio import ASR_RATE
from app.core import events as ev
from app.core.answering import Answering
from app.core.barge_in import cut_by_speech
from app.core.chunking import ChunkSettings
from app.core.echo import EchoGuard
from app.core.limits import AudioAllowance, IdleClock, LimitSettings
from app.core.listening import Listener
from app.core.memory import Memory
from app.core.metrics import Metrics
from app.core.outbox import Outbox
from app.core.pending import PendingTurn
from app.core.reading_ahead import ReadAhead
from app.core.turns import TurnSettings
from app.engines.llm import Message
from app.engines.loaded import Engines

log = logging.getLogger(__name__)

CARRY_GAP = np.zeros(ASR_RATE // 5, np.float32)  # between a resumed turn's two parts


class ConversationSettings(Protocol):
    """The parts of the server's settings a conversation reads (app/config.py's Settings has them)."""

    @property
    def turns(self) -> TurnSettings: ...

    @property
    def chunking(self) -> ChunkSettings: ...

    @property
    def limits(self) -> LimitSettings: ...


class Conversation:
    def __init__(self, engines: Engines, settings: ConversationSettings, metrics: Metrics | None = None) -> None:
        self.engines = engines
        self.turns = settings.turns
        self.metrics = metrics or Metrics()
        self.id = uuid.uuid4().hex[:12]
        self.options = ev.Options()
        self.defaults = ev.ReplyRequest()  # how replies are made where a turn does not say (an adapter's session)
        self.memory = Memory(self.metrics)
        self.playback_end = 0.0  # perf_counter() when the listener will have played all reply audio
        # Its `bytes`: reply audio is capped (limits.max_outgoing_bytes), other events are not, so an adapter
        # closes a client that keeps sending but never reads past a bound of its own.
        self.outbox = Outbox(settings.limits.max_outgoing_bytes)
        self.idle, self.allowance = IdleClock(), AudioAllowance.of(settings.limits, self.metrics.count_input)
        self._answering = Answering(self, max_queued=settings.limits.max_queued_turns, chunking=settings.chunking,
                                    echo=EchoGuard(settings.turns.echo))
        self._ahead = ReadAhead(engines, self.turns, self.id, prompt_for=self._prompt_for, show=self._show_interim)
        self._turn_ids = itertools.count(1)
        self._listener: Listener | None = None
        self._voice = engines.tts.new_voice()
        self._runner: asyncio.Task[None] | None = None
        self._state: ev.State | None = None
        self._speaking_turn: int | None = None  # id given to the user's turn when speech began
        self._carry: np.ndarray | None = None  # speech of a turn the user went on talking over

    # ------------------------------------------------------------ life and events

    def start(self) -> None:
        """Begin answering turns (on the running event loop)."""
        self._runner = asyncio.create_task(self._answering.run())
        self.metrics.sessions.inc()
        self.set_state("idle")

    async def close(self) -> None:
        """Stop all work of this conversation; next_event() then returns None."""
        self.metrics.sessions.dec()
        self._ahead.close()
        if self._listener is not None:
            self._listener.end()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)  # the last turn has ended
        self.outbox.put(None)

    async def next_event(self) -> ev.Event | None:
        """The next event, in the order they happened; None once closed. Audio of a reply that
        was cut off is dropped, even if it was produced before the cut."""
        return await self.outbox.get()

    def emit(self, event: ev.Event) -> None:
        self.idle.saw(event)
        if isinstance(event, ev.Error):
            self.metrics.errors.labels(event.code).inc()
        if self.outbox.put(event):
            return
        assert isinstance(event, ev.ReplyAudio), "only audio is ever refused"
        # The client stopped reading: rather than buffer its reply without bound, drop the rest of its audio and
        # end the turn (the next starts with an empty outbox).
        if self.outbox.stop_turn(event.turn):
            log.warning("conversation %s: the client is not reading (%d bytes wait to go out, at most %d): dropping "
                        "the rest of turn %d's audio", self.id, self.outbox.bytes, self.outbox.cap_bytes, event.turn)
            self.metrics.dropped_audio.inc()
            self.emit(ev.error("slow_client", event.turn))
            self.interrupt(None, cause="slow_client")

    def set_state(self, state: ev.State) -> None:
        if state != self._state:
            self._state = state
            self.emit(ev.StateChanged(state))

    def resting_state(self) -> ev.State:
        return "listening" if self._listener is not None else "idle"

    def reply_options(self) -> tuple[ev.Options, object | None]:
        """The options and voice for a reply about to start."""
        return self.options, self._voice

    # ------------------------------------------------------------ inputs

    def configure(self, options: ev.Options) -> None:
        if options.speaker != self.options.speaker:  # a new voice starts a fresh memory
            self._voice = self.engines.tts.new_voice(options.speaker)
        self.options = options
        if self._listener is not None:  # the user switched mode or pause mid-sentence
            self._listener.apply(options)

    def listen(self) -> Listener:
        """A new recording: feed its PCM to the listener this returns."""
        self.stop_listening()
        self._listener = Listener(self, self.engines.vad_model, self.turns, self.options, self.engines.smart_turn,
                                  echo=self._answering.echo, allowance=self.allowance)
        if not self._answering.busy:
            self.set_state("listening")
        return self._listener

    def stop_listening(self) -> None:
        """The microphone is off (its listener's end() follows when its audio is all heard)."""
        if self._listener is not None:
            self._listener = None
            if not self._answering.busy:
                self.set_state("idle")

    def say(self, text: str) -> None:
        """A typed message, answered like a spoken one; typed while it talks, it stops the reply."""
        self.interrupt(None, cause="client")
        self.respond(None, text=text.strip())

    def respond(self, request: ev.ReplyRequest | None, *, text: str | None = None,
                audio: np.ndarray | None = None) -> None:
        """A reply made as `request` says, to typed `text`, to spoken `audio` (a turn of exactly that), or with
        neither to the history as it is (a greeting, the answer to a function's result), in its turn."""
        now = time.perf_counter()
        self._answering.add(PendingTurn(next(self._turn_ids), now, now, audio=audio, text=text, request=request))

    def interrupt(self, played: int | None, *, cause: str = "client") -> str | None:
        """Stop the reply: cancel the running turn, or trim what the history says was heard.
        `played`: samples of its audio the listener heard; None: estimate by the playback clock.
        Returns the words heard of a finished reply it cut (a running turn's are in its TurnEnd)."""
        if (cut := self._answering.cut_off(cause, played)) is not None:
            self.outbox.silenced.add(cut[0].id)  # queued audio stops now, not when the task unwinds
        self.playback_end = 0.0
        return None if cut is not None else self.memory.cut_last(played)

    def reset(self) -> None:
        """New conversation: stop the reply, drop queued turns, forget the history."""
        for turn_id in self._answering.drop_queued():
            self.emit(ev.TurnEnd(turn_id, "interrupted"))
        self._answering.guesses.drop()
        self.interrupt(None, cause="reset")
        self.memory.forget()
        self._carry = None
        self._voice = self.engines.tts.new_voice(self.options.speaker)

    # ------------------------------------------------------------ what the listener found

    def speech_started(self, t_onset: float | None = None) -> None:
        """The user speaks, since `t_onset` (perf_counter(); None: now)."""
        self._speaking_turn = next(self._turn_ids)
        self.emit(ev.SpeechStarted(self._speaking_turn))
        cause, carry = cut_by_speech(self._answering, self.memory, t_onset, self.turns, self.options)
        if cause in ("continued", "speech"):
            self._carry = carry if carry is not None else self._carry
            self.interrupt(None, cause=cause)
            self.emit(ev.BargeIn(True))  # the page may have held its playback already: it stops for good
        elif cause is None and self.turns.speculate:
            self._ahead.prefill()

    def interim(self, audio: np.ndarray) -> None:
        if self._speaking_turn is not None:
            self._ahead.interim(self._speaking_turn, audio)

    def _show_interim(self, turn_id: int, text: str) -> bool:
        if self._speaking_turn != turn_id:
            return False  # the final transcript has overtaken it
        self.emit(ev.Transcript(turn_id, text, final=False))
        return True

    def _prompt_for(self, words: str) -> list[Message]:
        return self.engines.llm.build_messages(list(self.memory.messages()), words, self.options.system_prompt)

    def paused(self, listener: Listener, audio: np.ndarray, t_speech_end: float) -> None:
        """The user paused: if the turn ends here, `audio` is all of it. Transcribe it and start the
        reply now, held back until speech_turn() confirms it; the listener gets the language
        model's opinion of the words for its end-of-turn decision (None: none coming)."""
        turn_id = self._speaking_turn
        if turn_id is None or self._carry is not None or not self.turns.speculate:
            listener.words_judged(audio, None)
            return
        judged: Callable[[float | None], None] | None = functools.partial(listener.words_judged, audio)
        if not hasattr(self.engines.llm, "end_of_turn_probability"):  # a server's: the sound decides at once
            listener.words_judged(audio, None)
            judged = None
        guess = PendingTurn(turn_id, t_speech_end, t_speech_end, audio, on_words=judged, answer=listener.answers)
        self._answering.speculate(guess)

    def resumed(self) -> None:
        """The user went on after a pause: the guess is void."""
        self._answering.guesses.drop()

    def speech_turn(self, audio: np.ndarray, t_speech_end: float, t_decided: float, ended_by: str = "silence",
                    answer: bool = True) -> None:
        turn_id, self._speaking_turn = self._speaking_turn or next(self._turn_ids), None
        if self._carry is not None:  # the user had paused, not finished: answer both parts
            audio, self._carry = np.concatenate([self._carry, CARRY_GAP, audio]), None
        self.metrics.end_of_turn.labels(ended_by).inc()
        self.emit(ev.SpeechStopped())
        self._answering.add(PendingTurn(turn_id, t_speech_end, t_decided, audio=audio, answer=answer))

    def recording_ended(self, listener: Listener, error: str | None) -> None:
        if error is not None:
            log.warning("conversation %s: could not decode the microphone audio: %s", self.id, error)
            self.emit(ev.error("bad_audio"))
        if listener.turns_found == 0:  # the user stopped without saying anything
            turn_id, self._speaking_turn = self._speaking_turn or next(self._turn_ids), None
            self.metrics.turns.labels("no_speech").inc()  # a turn like any other: counted by reason
            self.emit(ev.TurnEnd(turn_id, "no_speech"))
        if self._listener is listener:
            self._listener = None
            if not self._answering.busy:
                self.set_state("idle")

