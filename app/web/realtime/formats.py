"""The audio formats /v1/realtime speaks, both ways: PCM16 at 24 kHz (audio/pcm), and the telephone's G.711 at
8 kHz, mu-law (audio/pcmu) and A-law (audio/pcma), one byte a sample (app/web/realtime/g711.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from app.web.realtime import g711
from app.web.realtime import protocol as rt
from app.web.realtime.errors import Refused


def _pcm16_decode(raw: bytes) -> np.ndarray:
    if len(raw) % 2:
        raise Refused("invalid_audio", "audio")
    return np.frombuffer(raw, "<i2")


@dataclass(frozen=True)
class WireFormat:
    """One format of the wire: its samples as bytes, and back (int16 samples, shape (n,))."""

    type: str
    rate: int
    _decode: Callable[[bytes], np.ndarray]
    _encode: Callable[[np.ndarray], np.ndarray]

    def decode(self, raw: bytes) -> np.ndarray:
        return self._decode(raw)

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._encode(pcm).tobytes()

    def info(self) -> rt.Format:
        return rt.Format(self.type, self.rate)


PCM = WireFormat("audio/pcm", rt.RATE, _pcm16_decode, lambda pcm: np.asarray(pcm, "<i2"))
PCMU = WireFormat("audio/pcmu", 8000, lambda raw: g711.ulaw_decode(np.frombuffer(raw, np.uint8)), g711.ulaw_encode)
PCMA = WireFormat("audio/pcma", 8000, lambda raw: g711.alaw_decode(np.frombuffer(raw, np.uint8)), g711.alaw_encode)
FORMATS = {f.type: f for f in (PCM, PCMU, PCMA)}


def wire_format(wanted: rt.AudioFormat | msgspec.UnsetType, current: WireFormat, where: str) -> WireFormat:
    """The format a session.update asks for (absent: `current`); Refused for a type or rate we do not speak."""
    if wanted is msgspec.UNSET:
        return current
    found = FORMATS.get(wanted.type)
    if found is None or wanted.rate not in (None, found.rate):
        raise Refused("unsupported", f"session.audio.{where}.format")
    return found
