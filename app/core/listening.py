"""Listening to one recording: its 16 kHz PCM goes through Silero VAD and the end-of-turn rules on a
thread of its own, and what they find (speech started, an interim snapshot, a pause, speech after
it, a finished turn, the end of the recording) is handed to the conversation on its event loop.
At the first short silence the conversation starts answering the turn on speculation; from a pause on,
this thread ends the turn once the silence is as long as app/core/end_rule.py asks, from the LLM's
reading of the words (which the conversation sends back) and Smart Turn's hearing of the sound (run here).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
import numpy as np
import onnxruntime

from app.audio import ASR_RATE
from app.core.echo import EchoCheck, EchoGuard
from app.core.end_rule import EndRule
from app.core.events import BargeIn, Error, Options
from app.core.events import error as error_event
from app.core.limits import AudioAllowance
from app.core.turns import Event, TurnDetector, TurnSettings
from app.engines.smart_turn import SmartTurn
from app.engines.vad import WINDOW, StreamingVad

log = logging.getLogger(__name__)


class Heard(Protocol):
    """Where a Listener reports what it found, on the event loop (app/core/conversation.py is one)."""

    id: str
    playback_end: float  # perf_counter() until which the assistant's voice plays (read on the thread)

    def emit(self, event: BargeIn | Error) -> None: ...

    def speech_started(self, t_onset: float) -> None: ...

    def interim(self, audio: np.ndarray) -> None: ...

    def paused(self, listener: Listener, audio: np.ndarray, t_speech_end: float) -> None: ...

    def resumed(self) -> None: ...

    def speech_turn(self, audio: np.ndarray, t_speech_end: float, t_decided: float, ended_by: str,
                    answer: bool) -> None: ...

    def recording_ended(self, listener: Listener, error: str | None) -> None: ...


class _End:
    def __init__(self, error: str | None) -> None:
        self.error = error


_UNREAD = object()  # the words of the candidate have not been judged yet
_UNHEARD = object()  # nor its sound


class _Words:
    def __init__(self, audio: np.ndarray, probability: float | None) -> None:
        self.audio = audio
        self.probability = probability


class Listener:
    """One microphone stream. feed() and end() may be called from any thread."""

    def __init__(
        self,
        conversation: Heard,
        vad_model: onnxruntime.InferenceSession,
        settings: TurnSettings,
        options: Options,
        smart_turn: SmartTurn | None = None,
        echo: EchoGuard | None = None,
        allowance: AudioAllowance | None = None,
    ) -> None:
        self._conversation = conversation
        self._allowance = allowance  # the session's: audio past it is dropped (None: all is heard)
        self._loop = asyncio.get_running_loop()
        # A VAD state of its own: the previous recording's thread may still be draining.
        self.detector = TurnDetector(settings, StreamingVad(vad_model))
        if echo is not None:  # the assistant's voice, heard back, is not the user barging in
            self.detector.echo = EchoCheck(echo, self._time_of)
        self._smart_turn = smart_turn if settings.end_of_turn == "smart" else None
        self._settings = settings
        self._candidate: np.ndarray | None = None  # the turn as it stands since the current silence
        self._words_verdict: float | None | object = _UNREAD  # the LLM's, for the candidate
        self._sound_verdict: float | None | object = _UNHEARD  # Smart Turn's
        self.apply(options)
        self.turns_found = 0
        self._inbox: queue.SimpleQueue[np.ndarray | _Words | _End] = queue.SimpleQueue()
        self._waiting = 0  # samples fed but not yet heard
        self._waiting_lock = threading.Lock()
        threading.Thread(target=self._run, name="listener", daemon=True).start()

    def apply(self, options: Options) -> None:
        """Hands-free or push-to-talk, and the pause that ends a turn; also for the turn being
        spoken (the detector reads them on its thread at its next 32 ms window). A pause the user chose
        is how long they want it to wait when it is unsure whether they have finished: the end rule's
        unsure wait too (its sure verdicts still end a turn at once)."""
        push_to_talk = options.mode == "push_to_talk"
        self.answers = options.answer_speech or push_to_talk  # a recording pushed to talk is always answered
        self.detector.set_end(end_silence_ms=options.end_silence_ms, push_to_talk=push_to_talk)
        settings, chosen = self._settings, options.end_silence_ms
        if chosen is not None:
            unsure = max(chosen, settings.pause_ms)
            settings = msgspec.structs.replace(settings, unsure_silence_ms=unsure, end_silence_ms=unsure)
        self._rule = EndRule(settings)  # one attribute: the listener's thread reads it whole

    def feed(self, pcm: np.ndarray) -> bool:
        """More of the recording: mono float32 at 16 kHz. False: it came faster than the session's allowance
        and was dropped (the client is told, now and then); so is audio that would leave more than the allowance's
        burst waiting to be heard."""
        if self._allowance is not None:
            with self._waiting_lock:
                fits = self._allowance.take(len(pcm) / ASR_RATE, self._waiting / ASR_RATE)
                self._waiting += len(pcm) if fits else 0
            if not fits:
                self._dropped()
                return False
        self._inbox.put(pcm)
        return True

    def _dropped(self) -> None:
        assert self._allowance is not None
        if self._allowance.tell_now():
            log.info("conversation %s: the input audio comes faster than %.1fx real time, or than it can be "
                     "heard: dropping it", self._conversation.id, self._allowance.speed)
            self._post(self._conversation.emit, error_event("audio_too_fast"))

    def words_judged(self, audio: np.ndarray, probability: float | None) -> None:
        """The language model's probability that the words of the candidate `audio` end the turn
        (None: it has no opinion); from the conversation, on its event loop."""
        self._inbox.put(_Words(audio, probability))

    def end(self, error: str | None = None) -> None:
        """The recording is over (with why, if it could not be read); speech in progress ends its turn."""
        self._inbox.put(_End(error))

    def _run(self) -> None:
        while not isinstance(item := self._inbox.get(), _End):
            if isinstance(item, _Words):
                self._words(item)
                continue
            self._hear(item)
            with self._waiting_lock:
                self._waiting -= len(item)
        if (event := self.detector.flush()) is not None:
            self._report(event)
        self._post(self._conversation.recording_ended, self, item.error)

    def _hear(self, pcm: np.ndarray) -> None:
        # While the assistant speaks, only confident speech counts (its own voice may leak in).
        self.detector.strict = time.perf_counter() < self._conversation.playback_end
        # One VAD window at a time, so a pause is judged before the audio after it is heard.
        for start in range(0, len(pcm), WINDOW):
            for event in self.detector.feed(pcm[start : start + WINDOW]):
                self._report(event)
            self._judge_pause()  # the silence grew: it may be long enough now

    def _report(self, event: Event) -> None:
        if event is Event.SPEECH_STARTED:
            self._post(self._conversation.speech_started, self._time_of(self.detector.onset))
        elif event is Event.INTERIM:
            self._post(self._conversation.interim, self.detector.snapshot())
        elif event is Event.QUIET:
            audio, speech_end = self.detector.candidate()
            self._candidate, self._words_verdict, self._sound_verdict = audio, _UNREAD, _UNHEARD
            self._post(self._conversation.paused, self, audio, self._time_of(speech_end))
        elif event is Event.PAUSED:
            self._judge_pause()
        elif event is Event.REJECTED:
            # Not the user (the reply's echo, a cough): a page that held its playback on it plays on.
            if time.perf_counter() < self._conversation.playback_end:
                self._post(self._conversation.emit, BargeIn(False))
        elif event is Event.RESUMED:
            self._candidate = None
            self._post(self._conversation.resumed)
        else:
            self._candidate = None
            self.turns_found += 1
            audio, speech_end, ended_by = self.detector.take_turn()
            self._post(self._conversation.speech_turn, audio, self._time_of(speech_end), time.perf_counter(),
                       ended_by, self.answers)

    def _time_of(self, position: int) -> float:
        """perf_counter() of a stream position: the stream runs in real time, so it was as long
        ago as the audio heard after it."""
        return time.perf_counter() - (self.detector.position - position) / ASR_RATE

    def _words(self, words: _Words) -> None:
        """The conversation's verdict on the words of the candidate has come."""
        if words.audio is self._candidate:  # else the user has talked over that silence
            self._words_verdict = words.probability
            self._judge_pause()

    def _judge_pause(self) -> None:
        """End the paused turn once its silence is as long as the end rule asks for: checked at every
        window of a pause, and when the words' verdict comes. Smart Turn hears the pause once."""
        if self._smart_turn is None or self._candidate is None or not self.detector.paused:
            return
        if self._sound_verdict is _UNHEARD:
            self._sound_verdict = self._sound(self._candidate)
        due = self._words_verdict is _UNREAD
        words = None if due else self._words_verdict
        needed = self._rule.silence_needed_ms(self._sound_verdict, words, words_due=due)  # type: ignore[arg-type]
        if self.detector.silence_ms >= needed:
            log.debug("end of turn after %d ms: sound %s, words %s", self.detector.silence_ms,
                      self._sound_verdict, words)
            self._candidate = None
            self._report(self.detector.end_now())

    def _sound(self, audio: np.ndarray) -> float | None:
        """Smart Turn's probability that the paused turn is finished (None if it failed: then only
        the longer silence ends the turn)."""
        try:
            return self._smart_turn.probability(audio)  # type: ignore[union-attr]
        except Exception:
            log.warning("Smart Turn failed; the turn ends after the longer silence", exc_info=True)
            return None

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone: the conversation has ended
            pass
