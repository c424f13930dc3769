"""End of turn: the rules that turn Silero VAD's speech probabilities (app/engines/vad.py) into user turns.

A turn starts with sustained speech. It ends after `end_silence_ms` of silence, or, with the
"smart" rule, sooner: at the first `pause_ms` of silence the detector reports a PAUSED candidate
turn, and the listener ends it (end_now()) once the silence is as long as app/core/end_rule.py asks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Literal

import msgspec
import numpy as np

from app.audio import ASR_RATE
from app.core.echo import EchoSettings
from app.engines.vad import WINDOW, StreamingVad

# What ended a turn: Smart Turn at a pause, the longest silence, the length cap, or the recording's end.
EndedBy = Literal["smart", "silence", "length", "released"]
NEVER = 1 << 62  # an end-of-silence no stream reaches: push-to-talk turns end at flush() only


class TurnSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    speech_threshold: float = 0.5  # probability that counts as speech
    silence_threshold: float = 0.35  # below this counts as silence (hysteresis)
    min_speech_ms: int = 250  # shorter bursts (clicks, coughs) never start a turn
    # How a hands-free turn ends. "smart": from pause_ms of silence on, Smart Turn's and the LLM's verdicts
    # decide how much silence ends it (end_rule.py); "silence": only end_silence_ms.
    end_of_turn: Literal["smart", "silence"] = "smart"
    # The first silence after which a turn may end, Smart Turn's cue: a shorter gap inside a sentence ends
    # nothing. Of the 45 gaps inside the tuning half's sentences (as Opus brings them), 11 last 224 ms or
    # more and 15 last 192 ms: each shorter pause_ms cuts more sentences in their own pauses.
    pause_ms: int = 224
    # Speculation starts sooner, at this much silence: by pause_ms the transcript is under way. Shorter
    # gaps inside a sentence (32-64 ms between words, measured on the repo's recordings) do not start it.
    speculate_ms: int = 96
    # How a pause is judged (app/core/end_rule.py): "fused" reads Smart Turn's verdict on the sound and the
    # LLM's on the words, both calibrated on the tuning half of tests/data/turns with the cpu preset's
    # SmolLM2-135M; "sound" reads Smart Turn's alone (the gpu preset, whose LLM is not calibrated here). A
    # model on a server, or a failed judge, gives no verdict on the words: then "fused" judges as "sound".
    decide_by: Literal["fused", "sound"] = "fused"
    # Smart Turn this sure ends the turn at pause_ms without waiting for the words: 29 of the tuning half's
    # 41 finished sentences score 0.9 or more, and 3 of its 17 thinking pauses.
    sure_sound: float = 0.9
    # The fused score, logit(sound) + logit(words), from which the turn ends as soon as both verdicts are
    # in: 36 of the 41 finished sentences score -3 or more, 2 of the 17 thinking pauses.
    finished_score: float = -3.0
    # Under it the turn ends after unsure_silence_ms, and under unsure_score after end_silence_ms: after "a",
    # "with" or "the" the LLM reads 0.000 and 13 of the 17 thinking pauses score under -6 (3 of the 41
    # finished sentences do). These three thresholds and pause_ms were chosen together on the tuning half
    # (benchmarks/bench_turns.py's verdicts, on an idle machine): of the rules that keep every kind's p90
    # added delay within 700 ms, the one that cuts fewest utterances (2 of 41 sentences, 3 of 17 thinking
    # pauses; the next fewer, 1 and 3, waits 938 ms at p90).
    unsure_score: float = -6.0
    # Smart Turn alone ("sound", or no verdict on the words): from this probability a turn ends after
    # unsure_silence_ms, under it only the longest silence ends it. 12 of the 17 thinking pauses score
    # under 0.1, 1 of the 41 finished sentences.
    unsure_sound: float = 0.1
    # Longer than the natural pauses inside the tuning half's sentences (0.64 s at most), shorter than most
    # thinking pauses (0.5-1.2 s).
    unsure_silence_ms: int = 800
    # This much silence always ends the turn (with "silence", the only rule): longer than the 0.5-1.2 s
    # thinking pauses of tests/data/turns.
    end_silence_ms: int = 1300
    # At the first pause, transcribe the turn and start the reply on the worker threads, held back
    # until the turn is confirmed (dropped if the person goes on): see app/core/answering.py.
    speculate: bool = True
    pad_ms: int = 200  # audio kept before the first speech window (Silero hears speech a little late)
    # Silence kept after the last speech window: Silero's probability already falls 30-110 ms after the
    # voice does, and a fitted Whisper window adds silence of its own (app/engines/asr.py).
    tail_ms: int = 96
    max_turn_s: float = 30.0  # endless speech is cut into turns of at most this length
    # While the assistant talks, its own voice may leak back through the microphone; only
    # confident, sustained speech counts as the user barging in.
    barge_in_threshold: float = 0.7  # mean speech probability over the run
    barge_in_min_speech_ms: int = 400
    # So the gate may accept an utterance late: JFK's "ask not" scores 0.4-0.75 and passes only with
    # "what your country" 2.5 s later. Until then the pre-roll keeps the utterance from its first speech
    # window (words less than end_silence_ms apart are one utterance), at most this much, so that the
    # turn has all its words; the cap bounds what leaked echo can add to it.
    barge_in_keep_s: float = 4.0
    # Speech that starts within this long after the reply began to play continues the user's turn:
    # it was ended too early. The reply stops and both parts are answered as one turn
    # (app/core/conversation.py); the cut reply is not remembered.
    continue_within_s: float = 1.5
    echo: EchoSettings = EchoSettings()  # the strict gate rejects the reply's own voice
    # A run of speech this long over the reply may already have paused the page's playback (static/app.js
    # holds it after ~130 ms): if the gate then rejects it, the listener says so, and the page plays on.
    barge_in_notice_ms: int = 96
    interim_every_ms: int = 1000  # re-transcribe the growing turn this often (0: never)

    def __post_init__(self) -> None:
        if not 0.0 < self.silence_threshold <= self.speech_threshold < 1.0:
            raise ValueError("need 0 < silence_threshold <= speech_threshold < 1")
        if not self.speech_threshold <= self.barge_in_threshold < 1.0:
            raise ValueError("need speech_threshold <= barge_in_threshold < 1")
        if self.continue_within_s < 0 or self.barge_in_keep_s < self.barge_in_min_speech_ms / 1000:
            raise ValueError("need continue_within_s >= 0 and barge_in_keep_s >= barge_in_min_speech_ms")
        if self.end_silence_ms < 100 or self.min_speech_ms < 0 or self.max_turn_s < 1:
            raise ValueError("end_silence_ms >= 100, min_speech_ms >= 0, max_turn_s >= 1")
        if not self.tail_ms <= self.speculate_ms <= self.pause_ms:
            # A candidate cut for speculation must hold the same audio as the turn that ends later.
            raise ValueError("need tail_ms <= speculate_ms <= pause_ms")
        if not 0.0 < self.unsure_sound <= self.sure_sound <= 1.0:
            raise ValueError("need 0 < unsure_sound <= sure_sound <= 1")
        if not self.unsure_score <= self.finished_score or not self.pause_ms <= self.unsure_silence_ms:
            raise ValueError("need unsure_score <= finished_score and pause_ms <= unsure_silence_ms")


class Event(Enum):
    SPEECH_STARTED = "speech_started"
    INTERIM = "interim"  # enough new speech for another interim transcript: see snapshot()
    QUIET = "quiet"  # speculate_ms of silence: candidate() may be answered on speculation
    PAUSED = "paused"  # pause_ms of silence: the turn may end now (end_now())
    RESUMED = "resumed"  # speech again after QUIET: the candidate is void
    REJECTED = "rejected"  # the strict gate turned down barge_in_notice_ms of speech-like sound (echo, a cough)
    TURN_ENDED = "turn_ended"


class TurnDetector:
    """Turns a 16 kHz stream into user turns: speech start, then enough silence ends it.

    feed() returns the events that the new audio caused; after TURN_ENDED, `take_turn()` gives
    the turn's audio and where in the stream its speech ended (for latency metrics). After QUIET,
    candidate() is what take_turn() would give if the turn ended without more speech; after
    PAUSED, end_now() ends it.
    """

    def __init__(self, settings: TurnSettings, vad: StreamingVad, *, push_to_talk: bool = False) -> None:
        self.settings = settings
        self._vad = vad
        ms = ASR_RATE // 1000
        self._min_speech = settings.min_speech_ms * ms
        self._barge_in_speech = settings.barge_in_min_speech_ms * ms
        self.set_end(push_to_talk=push_to_talk)
        self._interim_every = settings.interim_every_ms * ms
        self.strict = False  # set while the assistant speaks: barge-in needs real speech
        # While strict: is this run of speech the assistant's own voice, heard back? (audio of the run,
        # stream position of its end) -> True rejects it, None counts afresh; see app/core/echo.py.
        self.echo: Callable[[np.ndarray, int], bool | None] | None = None
        self._keep = int(settings.barge_in_keep_s * ASR_RATE)
        self._notice = settings.barge_in_notice_ms * ms
        self._pad = settings.pad_ms * ms
        self._tail = settings.tail_ms * ms
        self._max_turn = int(settings.max_turn_s * ASR_RATE)
        self.reset()

    def set_end(self, *, end_silence_ms: int | None = None, push_to_talk: bool = False) -> None:
        """How a turn ends: after `end_silence_ms` of silence (None: the settings' value), or with
        push_to_talk only when the button is released (flush). Takes effect at the next window,
        also in the middle of a turn; safe from another thread than feed()'s, as it is a single
        attribute write that _step() reads once per window."""
        ms = self.settings.end_silence_ms if end_silence_ms is None else end_silence_ms
        self._end_silence = NEVER if push_to_talk else ms * (ASR_RATE // 1000)
        # A pause only means something when silence can end the turn at all, and before it does.
        pause, quiet = (ms * (ASR_RATE // 1000) for ms in (self.settings.pause_ms, self.settings.speculate_ms))
        self._pause = NEVER if push_to_talk or pause >= self._end_silence else pause
        self._quiet = NEVER if push_to_talk or quiet >= self._end_silence else min(quiet, self._pause)

    def reset(self) -> None:
        self._vad.reset()
        self._pending = np.zeros(0, dtype=np.float32)  # < one window, not yet scored
        self._recent: list[np.ndarray] = []  # pre-roll while nobody speaks
        self._turn: list[np.ndarray] = []  # audio of the turn in progress
        self.position = 0  # samples scored since reset
        self._speech_run = 0  # consecutive-ish speech samples before the turn is confirmed
        self._run_confidence = 0.0  # sum of their speech probabilities
        self._silence_run = 0
        self.in_speech = False
        self.quiet = False  # QUIET was reported and no speech came since
        self.paused = False  # PAUSED too
        self._speech_end_at = 0
        self._next_interim = 0
        self.onset = 0  # stream position where the speech of the turn in progress (or last) began
        self._first_speech: int | None = None  # first speech window of the unaccepted utterance, if strict
        self._idle_silence = 0  # silence since the last speech window, before a turn starts
        # Finished turns not yet taken, oldest first: one feed() of a long block can end several.
        self._finished: deque[tuple[np.ndarray, int, EndedBy]] = deque()

    def feed(self, pcm: np.ndarray) -> list[Event]:
        events: list[Event] = []
        audio = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        n_windows = len(audio) // WINDOW
        for i in range(n_windows):
            events += self._step(audio[i * WINDOW : (i + 1) * WINDOW])
        self._pending = audio[n_windows * WINDOW :]
        return events

    def _step(self, window: np.ndarray) -> list[Event]:
        prob = self._vad(window)
        self.position += WINDOW
        if not self.in_speech:
            return [event] if (event := self._step_idle(window, prob)) is not None else []
        self._turn.append(window)
        if prob >= self.settings.silence_threshold:
            self._silence_run = 0
            self._speech_end_at = self.position
            if self.quiet:
                self.quiet = self.paused = False
                return [Event.RESUMED]
        else:
            self._silence_run += WINDOW
        turn_len = len(self._turn) * WINDOW
        if self._silence_run >= self._end_silence or turn_len >= self._max_turn:
            return [self._finish("silence" if self._silence_run >= self._end_silence else "length")]
        events = []
        if not self.quiet and self._silence_run >= self._quiet:
            self.quiet = True
            events.append(Event.QUIET)
        if not self.paused and self._silence_run >= self._pause:
            self.paused = True
            events.append(Event.PAUSED)
        if self._interim_every and self._silence_run == 0 and turn_len >= self._next_interim:
            self._next_interim = turn_len + self._interim_every
            events.append(Event.INTERIM)
        return events

    def _step_idle(self, window: np.ndarray, prob: float) -> Event | None:
        strict = self.strict
        needed = max(self._barge_in_speech if strict else self._min_speech, WINDOW)
        self._recent.append(window)
        self._track_utterance(prob, strict)
        del self._recent[: -self._pre_roll(needed)]
        if prob >= self.settings.speech_threshold:
            self._speech_run += WINDOW
            self._run_confidence += prob
        elif prob < self.settings.silence_threshold:
            noticed = strict and self._speech_run >= self._notice
            self._speech_run, self._run_confidence = 0, 0.0
            return Event.REJECTED if noticed else None  # too short, or not confident: a cough, a click
        if self._speech_run < needed:
            return None
        mean = self._run_confidence * WINDOW / self._speech_run
        if strict and mean < self.settings.barge_in_threshold:
            return None
        if strict and self.echo is not None:
            echo = self.echo(np.concatenate(self._recent[-(needed // WINDOW) :]), self.position)
            if echo is not False:  # its own voice, or not sure yet: count afresh
                # The utterance begins after the echo, or with the run in doubt: no reply words in the turn.
                self._first_speech = None if echo else self.position - self._speech_run
                self._speech_run, self._run_confidence = 0, 0.0
                return Event.REJECTED if echo else None
        return self._start_turn()

    def _track_utterance(self, prob: float, strict: bool) -> None:
        """Where the utterance under the strict gate began: words closer than end_silence_ms are one
        utterance, and a late-accepted one keeps its first words (barge_in_keep_s). It begins at the first
        window that is not silence: soft first words ("ask" in JFK's "ask not") score 0.4-0.6."""
        if prob >= self.settings.silence_threshold:
            self._idle_silence = 0
            if self._first_speech is None and strict:
                self._first_speech = self.position - WINDOW
        else:
            self._idle_silence += WINDOW
            if self._idle_silence >= self._end_silence:
                self._first_speech = None

    def _pre_roll(self, needed: int) -> int:
        """Windows of pre-roll to keep: the pad and the run not yet confirmed, or, under the strict
        gate, back to the utterance's first speech window."""
        windows = (self._pad + needed) // WINDOW + 1
        if self._first_speech is not None:
            since = min(self.position - self._first_speech + self._pad, self._keep)
            windows = max(windows, since // WINDOW + 1)
        return windows

    def _start_turn(self) -> Event:
        speech = self._speech_run if self._first_speech is None else self.position - self._first_speech
        kept = len(self._recent) * WINDOW
        self.onset = self.position - min(kept, speech)
        self.in_speech = True
        self._next_interim = self._interim_every
        self._turn = list(self._recent)
        self._recent = []
        self._first_speech = None
        self._silence_run = 0
        self._speech_end_at = self.position
        return Event.SPEECH_STARTED

    def flush(self) -> Event | None:
        """The stream ended (push-to-talk released): a turn in progress ends now."""
        if self.in_speech:
            return self._finish("released")
        return None

    def end_now(self) -> Event:
        """End the turn in progress here (the end rule judged its pause long enough)."""
        assert self.in_speech, "end_now() without a turn in progress"
        return self._finish("smart")

    @property
    def silence_ms(self) -> int:  # how long the speaker has been quiet in the turn in progress
        return self._silence_run * 1000 // ASR_RATE

    def candidate(self) -> tuple[np.ndarray, int]:
        """(audio, speech end) of the turn in progress as if it ended now: the same samples
        take_turn() gives if it does end without more speech."""
        trailing_silence = self.position - self._speech_end_at
        keep = len(self._turn) * WINDOW - max(0, trailing_silence - self._tail)
        audio = np.concatenate(self._turn)[:keep] if self._turn else np.zeros(0, np.float32)
        return audio, self._speech_end_at

    def _finish(self, ended_by: EndedBy) -> Event:
        self._finished.append((*self.candidate(), ended_by))
        self.in_speech = False
        self.quiet = self.paused = False
        self._turn = []
        self._speech_run, self._run_confidence = 0, 0.0
        self._silence_run = 0
        return Event.TURN_ENDED

    def snapshot(self) -> np.ndarray:
        """The audio of the turn in progress so far (for an interim transcript)."""
        return np.concatenate(self._turn) if self._turn else np.zeros(0, np.float32)

    def take_turn(self) -> tuple[np.ndarray, int, EndedBy]:
        """(audio of the finished turn, stream position in samples where its speech ended, what ended it)."""
        assert self._finished, "take_turn() without a TURN_ENDED event"
        return self._finished.popleft()
