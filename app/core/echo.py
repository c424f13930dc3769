"""Is the microphone hearing the assistant's own voice? The reply audio sent is kept on the playback clock;
a run of microphone speech is compared with what played just before it (lags 0-400 ms, plus slack).

Silero calls the assistant's voice speech, and a browser's echo canceller leaves some of it in the microphone.
Echo is the reply's sound again, delayed and filtered: the same syllables, the same spectral shape over time.
A person talking over it is another voice: their band energies follow the reply's no better than chance. So
the comparison is the normalised cross-correlation of log power spectrograms in 50 Hz bins (time x bin, each
bin's mean over time and each frame's over bins removed), the best over the lags; app/core/turns.py's strict
gate rejects a run that scores above `echo_threshold` (values measured: see EchoSettings).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import msgspec
import numpy as np

from app.audio import ASR_RATE

log = logging.getLogger(__name__)

HOP = ASR_RATE // 100  # 10 ms frames
FRAME = 2 * HOP  # 20 ms windows, half overlapping
LOW_BIN, HIGH_BIN = 100 * FRAME // ASR_RATE, 4000 * FRAME // ASR_RATE  # 100 Hz - 4 kHz, where voices are


class EchoSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The best correlation over the lags at which a run counts as the reply's echo. Measured with the cpu
    # preset's voice and JFK (tests/core/test_echo.py, 384 ms runs): the reply heard back 0-400 ms late,
    # 10 dB down, over noise, scored 0.82-1.00 (median 0.99) where it held speech; JFK talking over it, the
    # echo 20 dB under him, 0.07-0.38 (median 0.24). With the coarser 12-band envelopes tried first, the
    # person reached 0.70, inside the echo's range: voices share their loudness contour, not their harmonics.
    echo_threshold: float = 0.5
    max_lag_ms: int = 400  # the microphone hears the page's playback this much later at most
    slack_ms: int = 60  # the page may play earlier than the server's clock says (its jitter buffer)
    keep_s: float = 2.0  # reply audio kept after it played, to compare with


class EchoGuard:
    """The reply audio as it plays, at 16 kHz; played() on the event loop, is_echo() on the listener's thread."""

    def __init__(self, settings: EchoSettings = EchoSettings()) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._played: deque[tuple[float, np.ndarray]] = deque()  # (perf_counter() it starts to play, 16 kHz)

    def played(self, pcm: np.ndarray, rate: int, t_start: float) -> None:
        """Reply audio (int16 or float, at `rate`) that the page starts to play at `t_start`."""
        samples = pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        if rate != ASR_RATE:
            t = np.arange(int(len(samples) * ASR_RATE / rate)) * (rate / ASR_RATE)
            samples = np.interp(t, np.arange(len(samples)), samples).astype(np.float32)
        # A reply is sent faster than it plays: keep what played in the last keep_s and all that is to come.
        played_out = time.perf_counter() - self.settings.keep_s
        with self._lock:
            self._played.append((t_start, samples))
            while self._played and self._played[0][0] + len(self._played[0][1]) / ASR_RATE < played_out:
                self._played.popleft()

    def clear(self) -> None:
        with self._lock:
            self._played.clear()

    def similarity(self, mic: np.ndarray, t_end: float) -> float:
        """How closely `mic` (16 kHz, its last sample heard at `t_end`) follows the reply that played before
        it: the best correlation over the lags, 0 when nothing played then."""
        s = self.settings
        span = len(mic) / ASR_RATE
        reference = self._reference(t_end - span - s.max_lag_ms / 1000, t_end + s.slack_ms / 1000)
        if reference is None or len(mic) < 4 * FRAME:
            return 0.0
        a, b = _bands(mic), _bands(reference)
        if len(b) < len(a):
            return 0.0
        return max(_correlation(a, b[lag : lag + len(a)]) for lag in range(len(b) - len(a) + 1))

    def is_echo(self, mic: np.ndarray, t_end: float) -> bool:
        similarity = self.similarity(mic, t_end)
        log.debug("speech over the reply: %.2f like it (echo from %.2f)", similarity, self.settings.echo_threshold)
        return similarity >= self.settings.echo_threshold

    def _reference(self, t_from: float, t_to: float) -> np.ndarray | None:
        """What played from `t_from` to `t_to`, silence where nothing did; None if nothing did."""
        out = np.zeros(int((t_to - t_from) * ASR_RATE), np.float32)
        found = False
        with self._lock:
            segments = list(self._played)
        for t_start, samples in segments:
            start = int(round((t_start - t_from) * ASR_RATE))
            lo, hi = max(0, start), min(len(out), start + len(samples))
            if lo < hi:
                out[lo:hi] = samples[lo - start : hi - start]
                found = True
        return out if found else None



class EchoCheck:
    """The strict gate's question for one recording (app/core/turns.py): is this run of speech the reply's
    echo (True), the user (False), or not sure yet (None: count afresh, say nothing)?

    A cough over the echo spoils the comparison for the one run it falls in, which then looks foreign.
    So, while the reply's voice is coming back (an echo heard within `doubt_s`), the user must be heard
    over it twice, in two runs one after the other (a burst spoils at most one): barge-in over an audible
    echo takes about twice barge_in_min_speech_ms; where the echo canceller leaves none, once is enough."""

    def __init__(self, guard: EchoGuard, time_of: Callable[[int], float], doubt_s: float = 1.0) -> None:
        self._guard, self._time_of, self._doubt_s = guard, time_of, doubt_s
        self._echo_at = -1e9  # perf_counter() of the last run found to be echo
        self._doubted = False  # the last run looked foreign, right after an echo

    def __call__(self, audio: np.ndarray, end: int) -> bool | None:
        t_end = self._time_of(end)
        if self._guard.is_echo(audio, t_end):
            self._echo_at, self._doubted = t_end, False
            return True
        if t_end - self._echo_at < self._doubt_s and not self._doubted:
            self._doubted = True
            return None
        self._doubted = False
        return False


def _bands(pcm: np.ndarray) -> np.ndarray:
    """Log power spectrogram, (frames, bins of 50 Hz from 100 Hz to 4 kHz), every 10 ms: fine enough to see
    a voice's harmonics, which an echo shares with the reply and another voice does not."""
    frames = np.lib.stride_tricks.sliding_window_view(pcm, FRAME)[::HOP] * np.hanning(FRAME)
    power = np.abs(np.fft.rfft(frames, axis=1)[:, LOW_BIN:HIGH_BIN]) ** 2
    db = np.log10(power + 1e-12)
    return np.maximum(db, db.max() - 2.5)  # 25 dB below the loudest: silence and noise count alike


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two spectrograms, each band's mean over time removed (a fixed filter,
    the room's or the echo canceller's, shifts a band's level, not its movement)."""
    a, b = _centred(a), _centred(b)
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _centred(s: np.ndarray) -> np.ndarray:
    """Each bin's mean over time removed (a fixed filter, the room's or the echo canceller's, shifts a
    bin's level, not its movement), then each frame's over bins (loudness rises and falls with every voice's
    syllables alike: only the spectral shape tells one voice from another)."""
    s = s - s.mean(axis=0)
    return s - s.mean(axis=1, keepdims=True)
