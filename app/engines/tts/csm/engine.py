"""Sesame CSM-1B as the `gpu` preset's TtsEngine: per-conversation voice memory, loading.

Importing this module is cheap (no torch); its settings are in settings.py. `load_csm_engine` does the
heavy part: it takes every file on disk (start-up's fetching resolves them through loader.resolve_files
before any model loads, so a missing one fails fast), then loads the model, tokenizer, Mimi and the
optional voice prompt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from app.audio import float_to_int16, read_audio_file
from app.engines.tts.csm.settings import CsmSettings

if TYPE_CHECKING:
    from app.engines.tts.csm.generator import CsmGenerator, GenerationConfig, Segment, Utterance
    from app.engines.tts.csm.loader import CsmFiles

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
def generation_config(settings: CsmSettings) -> GenerationConfig:
    """The generator's per-utterance settings (imports torch: only when CSM loads)."""
    from app.engines.tts.csm.generator import GenerationConfig

    return GenerationConfig(
        temperature=settings.temperature,
        topk=settings.topk,
        first_chunk_frames=settings.first_chunk_frames,
        chunk_frames=settings.chunk_frames,
        max_audio_seconds=settings.max_audio_seconds,
        repeat_stop_frames=settings.repeat_stop_frames,
    )


class CsmVoice:
    """One conversation's voice memory: the assistant's recent utterances (text + audio codes).

    Feeding them back as context keeps the voice, pace and loudness consistent from phrase to
    phrase. Only utterances that ended cleanly are kept, oldest dropped beyond the frame budget.
    """

    def __init__(self, budget_frames: int, speaker: int | None = None) -> None:
        self.budget_frames = budget_frames
        self.speaker = speaker  # None: the engine's default speaker
        self._segments: deque[Segment] = deque()

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    def remember(self, segment: Segment) -> None:
        self._segments.append(segment)
        while self._segments and sum(s.codes.shape[0] for s in self._segments) > self.budget_frames:
            self._segments.popleft()

    def clear(self) -> None:
        self._segments.clear()


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


class CsmEngine:
    """TtsEngine over a loaded CsmGenerator. Calls come from one worker thread."""

    name = "csm"
    sample_rate = SAMPLE_RATE

    def __init__(
        self, generator: CsmGenerator, settings: CsmSettings, *, voice_prompt: Segment | None = None
    ) -> None:
        self.generator = generator
        self.settings = settings
        self.voice_prompt = voice_prompt
        self.speaker = settings.speaker_id()
        self.config = generation_config(settings)
        self.last_utterance: Utterance | None = None  # for metrics and tests

    def new_voice(self, speaker: int | None = None) -> CsmVoice:
        return CsmVoice(self.settings.context_frames, speaker)

    def synthesize(
        self, text: str, *, voice: object | None = None, cancel: threading.Event | None = None
    ) -> Iterator[np.ndarray]:
        yield from self._synthesize(text, voice=voice, cancel=cancel)

    def _synthesize(
        self, text: str, *, voice: object | None, cancel: threading.Event | None, max_frames: int | None = None
    ) -> Iterator[np.ndarray]:
        text = " ".join(text.split())
        if not _speakable(text):
            return
        memory = voice if isinstance(voice, CsmVoice) else None
        speaker = memory.speaker if memory is not None and memory.speaker is not None else self.speaker
        # The voice prompt shows how the default speaker sounds; it would mislead another one.
        pinned = [self.voice_prompt] if self.voice_prompt is not None and speaker == self.speaker else []
        utterance = self.generator.utterance(
            text,
            speaker=speaker,
            context=pinned + (memory.segments if memory else []),
            pinned=len(pinned),
            config=self.config,
            cancel=cancel,
            max_frames=max_frames,
        )
        self.last_utterance = utterance
        start = time.monotonic()
        for pcm in utterance:
            yield float_to_int16(pcm)
        self._log(text, utterance, time.monotonic() - start)
        if memory is not None and utterance.stop_reason == "eos" and utterance.codes.shape[0]:
            from app.engines.tts.csm.generator import Segment

            memory.remember(Segment(speaker=speaker, text=text, codes=utterance.codes))

    def _log(self, text: str, utterance: Utterance, seconds: float) -> None:
        frames = utterance.codes.shape[0]
        audio_s = frames / 12.5
        log.info(
            "csm: %d frames (%.2f s audio) in %.2f s, rtf %.2f, first chunk %s, stop %s, context %d: %.40r",
            frames,
            audio_s,
            seconds,
            seconds / audio_s if audio_s else float("nan"),
            f"{utterance.first_chunk_s:.3f} s" if utterance.first_chunk_s is not None else "none",
            utterance.stop_reason,
            utterance.prompt.segments_used,
            text,
        )

    def warm_up(self) -> None:
        """Compile the frame step if asked, then about a second of speech, remembered nowhere:
        first-call kernels, allocator, Mimi state. Start-up runs this before the port answers ok."""
        start = time.monotonic()
        self._compile()
        for _ in self._synthesize("Hello, I am ready.", voice=None, cancel=None, max_frames=12):
            pass
        log.info("csm: warmed up in %.2f s", time.monotonic() - start)

    def _compile(self) -> None:
        from app.engines.tts.csm.step import compile_mode, use_model_cache_for_inductor

        step = self.generator.step
        mode = compile_mode(self.settings.compile, step.device)
        if mode is None or step.compiled:
            return
        cache = use_model_cache_for_inductor()
        step.compile(mode)
        seconds = step.warm(topk=self.config.topk, temperature=self.config.temperature)
        if step.compiled:  # else step said once why it runs eagerly
            log.info("csm: compiled the frame step (%s) in %.1f s; inductor cache in %s", mode, seconds, cache)


# ---------------------------------------------------------------- loading


def pick_device(settings: CsmSettings) -> tuple[Any, Any]:
    """(torch device, torch dtype) for the settings: CUDA + bf16 when available, else CPU + fp32."""
    import torch

    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if settings.dtype != "auto":
        return device, getattr(torch, settings.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return device, torch.float32


def load_csm_engine(settings: CsmSettings, files: CsmFiles | None = None) -> CsmEngine:
    """Load everything CSM needs from `files` (start-up fetched them), else resolve (download on first
    launch) them first; blocking, call at start-up."""
    from app.engines.tts.csm import loader
    from app.engines.tts.csm.generator import CsmGenerator
    from app.engines.tts.csm.model import CsmModelConfig

    start = time.monotonic()
    device, dtype = pick_device(settings)
    files = files or loader.resolve_files(settings)
    config = msgspec.convert(settings.model_config, CsmModelConfig) if settings.model_config else None
    model = loader.load_csm_model(files.checkpoint, config=config, hints=files.hints, device=device, dtype=dtype)
    tokenizer = loader.load_text_tokenizer(str(files.tokenizer))
    mimi = loader.load_mimi(str(files.mimi), device=device, num_codebooks=model.config.audio_num_codebooks)
    generator = CsmGenerator(model, tokenizer, mimi, seed=settings.seed)
    voice_prompt = _voice_prompt(settings, generator)
    log.info("csm: loaded on %s (%s) in %.1f s", device, dtype, time.monotonic() - start)
    return CsmEngine(generator, settings, voice_prompt=voice_prompt)


def _voice_prompt(settings: CsmSettings, generator: CsmGenerator) -> Segment | None:
    """The settings' voice prompt as a context segment that every reply starts from, if there is one."""
    from app.engines.tts.csm.generator import Segment

    if settings.voice_prompt_wav is None or settings.voice_prompt_text is None:
        return None
    codes = generator.encode(read_audio_file(settings.voice_prompt_wav, SAMPLE_RATE))
    log.info("csm: voice prompt of %.1f s from %s", codes.shape[0] / 12.5, settings.voice_prompt_wav)
    if codes.shape[0] > generator.model.config.max_seq_len // 2:
        log.warning("csm: the voice prompt fills over half the context; it is dropped when a reply needs room")
    return Segment(speaker=settings.speaker_id(), text=settings.voice_prompt_text, codes=codes)
