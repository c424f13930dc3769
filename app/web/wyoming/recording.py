"""A recording sent for speech-to-text (transcribe, audio-start, audio-chunk..., audio-stop), gathered with its
checks: only what Home Assistant sends is taken, 16 kHz, 16-bit, mono, and at most limits.max_upload_s of it.
Another format is refused in words rather than resampled: a client sending one learns of it at once."""

from __future__ import annotations

import numpy as np

from app.audio import ASR_RATE

WIDTH, CHANNELS = 2, 1


class Refusal(Exception):
    """The recording is dropped; the message says why, for the peer."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


class Recording:
    def __init__(self, max_seconds: float) -> None:
        self._max_samples = int(max_seconds * ASR_RATE)
        self._max_seconds = max_seconds
        self._parts: list[np.ndarray] | None = None  # None: no recording open (or it was dropped)
        self._samples = 0
        self.language: str | None = None

    def transcribe(self, language: str | None) -> None:
        """`transcribe`: a recording follows, in `language` (None: the model's setting)."""
        self.language, self._parts, self._samples = language, [], 0

    def start(self, rate: int, width: int, channels: int) -> None:
        """`audio-start` (also without `transcribe` first: then the recording is transcribed all the same)."""
        self._parts, self._samples = None, 0
        _check(rate, width, channels)
        self._parts = []

    def add(self, audio: bytes, rate: int, width: int, channels: int) -> None:
        if self._parts is None:
            return  # dropped already, or none open
        try:
            _check(rate, width, channels)
            samples = len(audio) // WIDTH
            if self._samples + samples > self._max_samples:
                raise Refusal("audio_too_long", f"The recording is longer than {self._max_seconds:g} seconds "
                                                "(limits.max_upload_s); it was dropped.")
        except Refusal:
            self._parts = None
            raise
        self._parts.append(np.frombuffer(audio[: samples * WIDTH], "<i2").astype(np.float32) / 32768)
        self._samples += samples

    def stop(self) -> np.ndarray | None:
        """`audio-stop`: the recording as 16 kHz float32, or None when none was open (or it was dropped)."""
        parts, self._parts = self._parts, None
        if parts is None:
            return None
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _check(rate: int, width: int, channels: int) -> None:
    if (rate, width, channels) != (ASR_RATE, WIDTH, CHANNELS):
        raise Refusal("unsupported_audio_format",
                      f"Audio must be 16000 Hz, 16-bit (width 2), mono; this was {rate} Hz, width {width}, "
                      f"{channels} channel(s). The recording was dropped.")
