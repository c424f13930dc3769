"""The loaded models of one server, shared by every session, each behind its own worker thread."""

from __future__ import annotations

import logging
import time

from .asr import Transcriber
from .config import Settings
from .llm import ChatModel
from .tts.base import TtsEngine
from .tts.piper import PiperEngine
from .turns import load_vad_model
from .workers import Worker

log = logging.getLogger(__name__)


class Engines:
    def __init__(self, settings: Settings, asr: Transcriber, llm: ChatModel, tts: TtsEngine) -> None:
        self.settings = settings
        self.asr = asr
        self.llm = llm
        self.tts = tts
        self.vad_model = load_vad_model()
        self.asr_worker = Worker("asr")
        self.llm_worker = Worker("llm")
        self.tts_worker = Worker("tts")

    @classmethod
    def load(cls, settings: Settings) -> Engines:
        """Load and warm up every model (blocking: call it from a thread at start-up)."""
        asr = Transcriber.load(settings.asr)
        llm = ChatModel.load(settings.llm)
        tts = load_tts(settings)
        engines = cls(settings, asr, llm, tts)
        engines.warm_up()
        return engines

    def warm_up(self) -> None:
        for name, model in (("asr", self.asr), ("llm", self.llm), ("tts", self.tts)):
            t0 = time.perf_counter()
            model.warm_up()
            log.info("%s: warmed up in %.2f s", name, time.perf_counter() - t0)

    def describe(self) -> dict[str, str]:
        s = self.settings
        tts = s.tts.csm.model if s.tts.engine == "csm" else s.tts.piper.model
        return {"asr": s.asr.model, "llm": s.llm.model, "tts": tts}

    def close(self) -> None:
        for worker in (self.asr_worker, self.llm_worker, self.tts_worker):
            worker.close()


def load_tts(settings: Settings) -> TtsEngine:
    if settings.tts.engine == "csm":
        from .tts.csm.engine import load_csm_engine  # imports torch: only when CSM is wanted

        return load_csm_engine(settings.tts.csm)
    return PiperEngine.load(settings.tts.piper)
