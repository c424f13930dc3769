"""Sesame CSM-1B as the `gpu` preset's TtsEngine: per-conversation voice memory, loading.

Importing this module is cheap (no torch); its settings are in settings.py. `load_csm_engine` does the
heavy part: it takes every file on disk (start-up's fetching resolves them through loader.resolve_files
before any model loads, so a missing one fails fast), then loads the model, tokenizer, Mimi and the
optional voice prompt.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from app.audio import float_to_int16, read_audio_file
from app.engines.tts.csm.settings import CsmSettings

if TYPE_CHECKING:
    from app.engines.tts.csm.generator import CsmGenerator, GenerationConfig, Segment, Utterance
    from app.engines.tts.csm.loader import CsmFiles
    from app.engines.tts.csm.scheduler import BatchScheduler, Job

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


def job_pcm(job: Job, cancel: threading.Event | None) -> Iterator[np.ndarray]:
    """A batched phrase's float32 PCM chunks as the batch thread hands them over. A cancelled phrase
    returns at once: the thread drops it before it joins, or takes its row out at the next frame."""
    while True:
        try:
            kind, value, _ = job.items.get(timeout=0.05)
        except queue.Empty:
            if cancel is not None and cancel.is_set():
                return
            continue
        if kind == "error":
            raise value
        if kind == "end":
            return
        yield value


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
    """TtsEngine over a loaded CsmGenerator. Calls come from one worker thread, or with a batch
    scheduler from as many as it has slots (each phrase then waits on its job's queue)."""

    name = "csm"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        generator: CsmGenerator,
        settings: CsmSettings,
        *,
        voice_prompt: Segment | None = None,
        scheduler: BatchScheduler | None = None,
    ) -> None:
        self.generator = generator
        self.settings = settings
        self.voice_prompt = voice_prompt
        self.speaker = settings.speaker_id()
        self.config = generation_config(settings)
        self.last_utterance: Utterance | None = None  # for metrics and tests (one-at-a-time path)
        self.scheduler = scheduler  # settings.batch > 1: phrases share the batch thread's frame steps
        self.jobs = 0

    @property
    def concurrency(self) -> int:
        """How many phrases may be under way at once (the TTS worker's threads)."""
        return self.settings.batch if self.scheduler is not None else 1

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
        if self.scheduler is not None:
            yield from self._synthesize_batched(text, memory, cancel, max_frames)
            return
        speaker, utterance = self._plan(text, memory, cancel, max_frames)
        self.last_utterance = utterance
        start = time.monotonic()
        for pcm in utterance:
            yield float_to_int16(pcm)
        self._log(text, utterance, time.monotonic() - start)
        self._remember(memory, speaker, text, utterance.stop_reason, utterance.codes)

    def _plan(
        self, text: str, memory: CsmVoice | None, cancel: threading.Event | None, max_frames: int | None
    ) -> tuple[int, Utterance]:
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
        return speaker, utterance

    @staticmethod
    def _remember(memory: CsmVoice | None, speaker: int, text: str, reason: str | None, codes: Any) -> None:
        if memory is not None and reason == "eos" and codes.shape[0]:
            from app.engines.tts.csm.generator import Segment

            memory.remember(Segment(speaker=speaker, text=text, codes=codes))

    def _synthesize_batched(
        self, text: str, memory: CsmVoice | None, cancel: threading.Event | None, max_frames: int | None
    ) -> Iterator[np.ndarray]:
        """The phrase as a job of the batch thread; its prompt is planned when the thread admits it,
        after the session's previous phrase was remembered (so the voice memory is as up to date as
        on the one-at-a-time path), and remembered there on EOS before the session's next phrase."""
        from app.engines.tts.csm.scheduler import Job

        speaker = memory.speaker if memory is not None and memory.speaker is not None else self.speaker
        job = Job(
            session=memory if memory is not None else object(),  # no memory: a session of its own
            plan=lambda: self._plan(text, memory, None, max_frames)[1].prompt,
            config=self.config,
            rng=self._job_rng(),
            cancel=cancel,
            on_end=lambda reason, codes: self._remember(memory, speaker, text, reason, codes),
        )
        assert self.scheduler is not None
        start, first = time.monotonic(), None
        for pcm in job_pcm(self.scheduler.submit(job), cancel):
            first = time.monotonic() - start if first is None else first
            yield float_to_int16(pcm)
        frames = job.codes.shape[0] if job.codes is not None else 0
        log.info("csm batch: %d frames (%.2f s audio) in %.2f s, first chunk %s, stop %s: %.40r", frames,
                 frames / 12.5, time.monotonic() - start, f"{first:.3f} s" if first is not None else "none",
                 job.stop_reason, text)

    def _job_rng(self) -> Any:
        """Each phrase's own sampler noise: seeded from settings.seed and the phrase's number when set."""
        import torch

        rng = torch.Generator(device=self.generator.device)
        self.jobs += 1
        if self.settings.seed is None:
            rng.seed()
        else:
            rng.manual_seed(self.settings.seed + self.jobs)
        return rng

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
        if self.scheduler is None:
            step = self.generator.step
            self._compile(step, lambda: step.warm(topk=self.config.topk, temperature=self.config.temperature))
        else:  # on the batch thread, which replays what it records (CUDA graphs are per thread)
            batch = self.scheduler.batch
            self.scheduler.call(lambda: self._compile(batch.step, lambda: batch.step.warm_sizes(
                batch.sizes, topk=self.config.topk, temperature=self.config.temperature)))
        for _ in self._synthesize("Hello, I am ready.", voice=None, cancel=None, max_frames=12):
            pass
        log.info("csm: warmed up in %.2f s", time.monotonic() - start)

    def _compile(self, step: Any, warm: Callable[[], float]) -> None:
        from app.engines.tts.csm.step import compile_mode, use_model_cache_for_inductor

        mode = compile_mode(self.settings.compile, step.device)
        if mode is None or step.compiled:
            return
        cache = use_model_cache_for_inductor()
        step.compile(mode)
        seconds = warm()
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
    spares = [copy.deepcopy(mimi) for _ in range(settings.batch - 1)]  # copied before any streaming state
    generator = CsmGenerator(model, tokenizer, mimi, seed=settings.seed)
    voice_prompt = _voice_prompt(settings, generator)
    scheduler = batch_scheduler(generator, spares, slots=settings.batch, dtype=dtype) if spares else None
    log.info("csm: loaded on %s (%s) in %.1f s, batch %d", device, dtype, time.monotonic() - start, settings.batch)
    return CsmEngine(generator, settings, voice_prompt=voice_prompt, scheduler=scheduler)


def batch_scheduler(generator: CsmGenerator, spare_mimis: list[Any], *, slots: int, dtype: Any) -> BatchScheduler:
    """Slot caches for `slots` replies (the one-at-a-time path is then off), and the batch thread with
    one Mimi decoder per slot: the generator's own (the voice prompt was encoded with it) and the spares."""
    from app.engines.tts.csm.batch import CsmBatch
    from app.engines.tts.csm.scheduler import BatchScheduler, MimiDecoder

    generator.model.setup_caches(dtype, slots=slots)
    batch = CsmBatch(generator.model, generator.sampled_vocab)
    mimis = [generator.mimi, *spare_mimis]
    return BatchScheduler(batch, [MimiDecoder(mimi, generator.decode_frame_by_frame) for mimi in mimis])


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
