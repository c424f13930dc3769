"""Is the microphone hearing the assistant's own voice? The reply audio sent is kept on the playback clock;
a run of microphone speech is compared with what played just before it (lags 0-400 ms, plus slack).

Silero calls the assistant's voice speech, and a browser's echo canceller leaves some of it in the microphone.
Echo is the reply's sound again, delayed and filtered: the same syllables, the same spectral shape over time.
A person talking over it is another voice: their band energies follow the reply's no better than chance. So
the comparison is the normalised cross-correlation of log band-energy spectrograms (time x band, each band's
mean removed), the best over the lags; app/core/turns.py's strict gate rejects a run that scores above
`echo_threshold` (values measured: see EchoSettings).
"""

from __future__ import annotations

import threading
from collections import deque

import msgspec
import numpy as np

from app.audio import ASR_RATE

HOP = ASR_RATE // 100  # 10 ms frames
FRAME = 2 * HOP  # 20 ms windows, half overlapping
LOW_BIN, HIGH_BIN = 100 * FRAME // ASR_RATE, 4000 * FRAME // ASR_RATE  # 100 Hz - 4 kHz, where voices are


class EchoSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The best correlation over the lags at which a run counts as the reply's echo. Measured on the cpu
    # preset's voice (384 ms runs, every 0.37 s of an 8.7 s reply): its echo, delayed 0-400 ms, 20 or 10 dB
    # down, over noise 34 dB down, scored 0.61-1.00 (median 0.99) where it held speech; JFK talking over
    # the reply 0.03-0.41 (median 0.24), also with the echo 20 dB under him.
    echo_threshold: float = 0.5
    max_lag_ms: int = 400  # the microphone hears the page's playback this much later at most
    slack_ms: int = 60  # the page may play earlier than the server's clock says (its jitter buffer)
    keep_s: float = 8.0  # reply audio kept to compare with


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
        with self._lock:
            self._played.append((t_start, samples))
            while self._played and self._played[0][0] < t_start - self.settings.keep_s:
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
        return self.similarity(mic, t_end) >= self.settings.echo_threshold

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
