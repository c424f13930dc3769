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
from collections.abc import Callable, Coroutine

import numpy as np

from app.core import events as ev
from app.core.answering import Answering, PendingTurn
from app.audio import ASR_RATE
from app.engines.loaded import Engines
from app.core.listening import Listener
from app.engines.llm import Message
from app.core.memory import Memory
from app.core.metrics import Metrics
from app.core.outbox import Outbox

log = logging.getLogger(__name__)

CARRY_GAP = np.zeros(ASR_RATE // 5, np.float32)  # between a resumed turn's two parts


class Conversation:
    def __init__(self, engines: Engines, metrics: Metrics | None = None) -> None:
        self.engines = engines
        self.metrics = metrics or Metrics()
        self.id = uuid.uuid4().hex[:12]
        self.options = ev.Options()
        self.memory = Memory(self.metrics)
        self.playback_end = 0.0  # perf_counter() when the listener will have played all reply audio
        self._out = Outbox(engines.settings.limits.max_outgoing_bytes)
        self._silenced: set[int] = set()  # turns whose queued audio must not go out any more
        self._answering = Answering(self)
        self._turn_ids = itertools.count(1)
        self._listener: Listener | None = None
        self._voice = engines.tts.new_voice()
        self._runner: asyncio.Task[None] | None = None
        self._state: ev.State | None = None
        self._speaking_turn: int | None = None  # id given to the user's turn when speech began
        self._carry: np.ndarray | None = None  # speech of a turn the user went on talking over
        self._interim_busy = False
        self._background: set[asyncio.Task[None]] = set()

    @property
    def history(self) -> list[Message]:
        return self.memory.history

    # ------------------------------------------------------------ life and events

    def start(self) -> None:
        """Begin answering turns (on the running event loop)."""
        self._runner = asyncio.create_task(self._answering.run())
        self.metrics.sessions.inc()
        self.set_state("idle")

    async def close(self) -> None:
        """Stop all work of this conversation; next_event() then returns None."""
        self.metrics.sessions.dec()
        for task in (self._runner, *self._background):
            if task is not None:
                task.cancel()
        if self._listener is not None:
            self._listener.end()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)  # the last turn has ended
        self._out.put(None)

    async def next_event(self) -> ev.Event | None:
        """The next event, in the order they happened; None once closed. Audio of a reply that
        was cut off is dropped here, even if it was produced before the cut."""
        while (event := await self._out.get()) is not None:
            if not (isinstance(event, ev.ReplyAudio) and event.turn in self._silenced):
                return event
        return None

    @property
    def backlog_bytes(self) -> int:
        """What the events waiting to go out hold: reply audio is capped (limits.max_outgoing_bytes),
        other events are not, so an adapter closes a client that keeps sending but never reads."""
        return self._out.bytes

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, ev.Error):
            self.metrics.errors.labels(event.code).inc()
        if not self._out.put(event):
            assert isinstance(event, ev.ReplyAudio)  # only audio is ever refused
            self._client_behind(event.turn)

    def _client_behind(self, turn_id: int) -> None:
        """The client stopped reading: rather than buffer its reply without bound, drop the rest
        of the reply's audio and end the turn (the next turn starts with an empty outbox)."""
        if turn_id in self._silenced:
            return
        log.warning("conversation %s: the client is not reading (%d bytes wait to go out, at most %d): "
                    "dropping the rest of turn %d's audio", self.id, self._out.bytes, self._out.cap_bytes, turn_id)
        self.metrics.dropped_audio.inc()
        self._silenced.add(turn_id)
        self.emit(ev.error("slow_client", turn_id))
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
        turns = self.engines.settings.turns
        self._listener = Listener(self, self.engines.vad_model, turns, self.options, self.engines.smart_turn)
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
        now = time.perf_counter()
        self.interrupt(None, cause="client")
        self._answering.add(PendingTurn(next(self._turn_ids), now, now, text=text.strip()))

    def interrupt(self, played: int | None, *, cause: str = "client") -> None:
        """Stop the reply: cancel the running turn, or trim what the history says was heard.
        `played`: samples of its audio the listener heard; None: estimate by the playback clock."""
        if (cut := self._answering.cut_off(cause, played)) is not None:
            turn, reply = cut
            self._silenced.add(turn.id)  # queued audio stops now, not when the task unwinds
            if cause == "speech" and not reply.samples and turn.audio is not None:
                self._carry = turn.audio  # cut off before it spoke: the user was not done yet
        else:
            self.memory.cut_last(played)
        self.playback_end = 0.0

    def reset(self) -> None:
        """New conversation: stop the reply, drop queued turns, forget the history."""
        for turn_id in self._answering.drop_queued():
            self.emit(ev.TurnEnd(turn_id, "interrupted"))
        self._answering.drop_guess()
        self.interrupt(None, cause="reset")
        self.memory.forget()
        self._carry = None
        self._voice = self.engines.tts.new_voice(self.options.speaker)

    # ------------------------------------------------------------ what the listener found

    def speech_started(self) -> None:
        self._speaking_turn = next(self._turn_ids)
        self.emit(ev.SpeechStarted(self._speaking_turn))
        if self._answering.busy or self.memory.still_playing():
            self.interrupt(None, cause="speech")
        elif self.engines.settings.turns.speculate:
            self._in_background(self._prefill())

    async def _prefill(self, words: str = "") -> None:
        """While the user speaks, let the LLM evaluate the system prompt, the history and the words
        heard so far (an interim transcript) that its reply will start with (app/engines/llm.py
        ChatModel.prefill), so that the turn waits only for the words after them; the words' judge
        reads them ahead too. A model on a server keeps its own prefix cache."""
        llm, turns = self.engines.llm, self.engines.settings.turns
        if not hasattr(llm, "prefill"):
            return
        messages = llm.build_messages(list(self.memory.history), words, self.options.system_prompt)
        jobs = [self.engines.llm_worker.run(llm.prefill, messages)]
        if words and turns.end_of_turn == "smart" and turns.decide_by != "sound":
            jobs.append(self.engines.judge_worker.run(llm.end_of_turn_probability, messages))
        try:
            await asyncio.gather(*jobs)
        except Exception:
            log.warning("conversation %s: evaluating the prompt ahead failed", self.id, exc_info=True)

    def _in_background(self, job: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def interim(self, audio: np.ndarray) -> None:
        turn_id = self._speaking_turn
        if turn_id is None or self._interim_busy:
            return  # one interim at a time: never let guesses queue up before the final
        self._interim_busy = True
        self._in_background(self._interim(turn_id, audio))

    async def _interim(self, turn_id: int, audio: np.ndarray) -> None:
        try:
            text = await self.engines.asr_worker.run(self.engines.asr.transcribe, audio)
        except Exception:
            log.warning("conversation %s: interim transcript failed", self.id, exc_info=True)
            return
        finally:
            self._interim_busy = False
        if text and self._speaking_turn == turn_id:  # the final transcript has not overtaken it
            self.emit(ev.Transcript(turn_id, text, final=False))
            if self.engines.settings.turns.speculate:
                await self._prefill(text)

    def paused(self, listener: Listener, audio: np.ndarray, t_speech_end: float) -> None:
        """The user paused: if the turn ends here, `audio` is all of it. Transcribe it and start the
        reply now, held back until speech_turn() confirms it; the listener gets the language
        model's opinion of the words for its end-of-turn decision (None: none coming)."""
        turn_id = self._speaking_turn
        if turn_id is None or self._carry is not None or not self.engines.settings.turns.speculate:
            listener.words_judged(audio, None)
            return
        judged: Callable[[float | None], None] | None = functools.partial(listener.words_judged, audio)
        if not hasattr(self.engines.llm, "end_of_turn_probability"):
            # A model on a server cannot read the words for us: the sound decides at once.
            listener.words_judged(audio, None)
            judged = None
        self._answering.speculate(PendingTurn(turn_id, t_speech_end, t_speech_end, audio=audio, on_words=judged))

    def resumed(self) -> None:
        """The user went on after a pause: the guess is void."""
        self._answering.drop_guess()

    def speech_turn(self, audio: np.ndarray, t_speech_end: float, t_decided: float, ended_by: str = "silence") -> None:
        turn_id, self._speaking_turn = self._speaking_turn or next(self._turn_ids), None
        if self._carry is not None:  # the user had paused, not finished: answer both parts
            audio, self._carry = np.concatenate([self._carry, CARRY_GAP, audio]), None
        self.metrics.end_of_turn.labels(ended_by).inc()
        self.emit(ev.SpeechStopped())
        self._answering.add(PendingTurn(turn_id, t_speech_end, t_decided, audio=audio))

    def recording_ended(self, listener: Listener, error: str | None) -> None:
        if error is not None:
            log.warning("conversation %s: could not decode the microphone audio: %s", self.id, error)
            self.emit(ev.error("bad_audio"))
        if listener.turns_found == 0:  # the user stopped without saying anything
            turn_id = self._speaking_turn or next(self._turn_ids)
            self._speaking_turn = None
            self.metrics.turns.labels("no_speech").inc()  # a turn like any other: counted by reason
            self.emit(ev.TurnEnd(turn_id, "no_speech"))
        if self._listener is listener:
            self._listener = None
            if not self._answering.busy:
                self.set_state("idle")
