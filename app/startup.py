"""Start-up: from settings to warm engines, on a thread behind the already open port.

The one place that turns the whole Settings into engines (each engine gets its own part). The web's
lifespan (app/web/server.py) starts a BackgroundLoad; it fetches every file first
(app/engines/fetching.py, through models.py), then loads each model and warms it up (GPU memory
measured by app/engines/gpu_memory.py), falling back to the offline cpu preset when an auto-picked gpu
model cannot be had. The result goes to the app as an Engines (app/engines/loaded.py), which every
session's conversation then uses; a failure goes to /health and `serve` as one line. LoadStatus
(app/engines/loading.py) carries the progress meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from app.config import ConfigError, Settings, load_settings
from app.engines.asr import Transcriber
from app.engines.fetching import LocalModels, fetch_models
from app.engines.gpu_memory import GpuMemory, measured
from app.engines.llm import ChatModel
from app.engines.llm_remote import LlmServerError, RemoteChatModel
from app.engines.loaded import Engines
from app.engines.loading import LoadStatus, Phase
from app.engines.models import ModelError, ModelMismatchError
from app.engines.speech_remote import RemoteTranscriber, RemoteVoice, SpeechServerError
from app.engines.tts.base import TtsEngine
from app.engines.tts.piper import PiperEngine

log = logging.getLogger(__name__)

SLOT_NAMES = {"asr": "speech-to-text model", "llm": "language model", "tts": "voice"}
# Failures whose message says it all (slot, file or server, what to do): logged as one line, no traceback.
SAYS_IT_ALL = (ModelError, ModelMismatchError, ConfigError, LlmServerError, SpeechServerError)


def load_and_warm(settings: Settings, status: LoadStatus | None = None) -> Engines:
    """Fetch, load and warm up every model (blocking: call it from a thread at start-up).

    Every file is fetched before any model loads, so a missing one fails in seconds, not after
    a GPU load; the warm-up makes the first real turn as fast as the rest.
    """
    status = status or LoadStatus()
    gpu = gpu_meter(settings)
    local = fetch_models(settings.asr, settings.llm, settings.tts, status)
    # A language model on a server (backend openai) is asked with the files, before any model loads: a
    # server that is down fails in seconds too. It has no weights here to load.
    remote = RemoteChatModel.load(settings.llm) if settings.llm.backend == "openai" else None
    loaders: dict[str, Callable[[], Any]] = {
        "asr": lambda: load_asr(local),
        "llm": lambda: remote or ChatModel.load(local.llm),
        "tts": lambda: load_tts(local),
    }
    loaded = {}
    for slot, load in loaders.items():
        _announce(status, "loading", slot)
        with measured(gpu, slot):
            loaded[slot] = load()
    engines = Engines(**loaded)
    with measured(gpu, "warm-up"):
        warm_up(engines, status)
    if gpu is not None:
        gpu.report()
    return engines


def gpu_meter(settings: Settings) -> GpuMemory | None:
    """A GPU memory meter when a model is meant for the GPU and CUDA is there (torch is imported
    only then); else None."""
    local_asr_on_gpu = settings.asr.device != "cpu" and settings.asr.backend == "faster_whisper"
    on_gpu = local_asr_on_gpu or settings.llm.n_gpu_layers != 0 or settings.tts.engine == "csm"
    return GpuMemory.probe() if on_gpu else None


def load_asr(local: LocalModels) -> Transcriber | RemoteTranscriber:
    """Whisper in this process, or an audio server's (asr.backend openai: nothing loads here)."""
    return RemoteTranscriber.load(local.asr) if local.asr.backend == "openai" else Transcriber.load(local.asr)


def load_tts(local: LocalModels) -> TtsEngine:
    settings = local.tts
    if settings.engine == "openai":
        return RemoteVoice.load(settings.openai)
    if settings.engine == "csm":
        from app.engines.tts.csm.engine import load_csm_engine  # its loading imports torch: only when CSM is wanted

        return load_csm_engine(settings.csm, local.csm)
    return PiperEngine.load(settings.piper)


def warm_up(engines: Engines, status: LoadStatus | None = None) -> None:
    """One short pass through each model: first-call kernels, allocator, caches."""
    for name, model in (("asr", engines.asr), ("llm", engines.llm), ("tts", engines.tts)):
        t0 = time.perf_counter()
        _announce(status, "warming", name)
        model.warm_up()
        log.info("%s: warmed up in %.2f s", name, time.perf_counter() - t0)


def _announce(status: LoadStatus | None, phase: Phase, slot: str) -> None:
    if status is not None:
        verb = "warming up" if phase == "warming" else "loading"
        status.set(phase, f"{verb} the {SLOT_NAMES[slot]}")


# ---------------------------------------------------------------- the cpu fallback


def cpu_fallback(settings: Settings) -> Settings:
    """The same server settings with the offline cpu preset's models; a model on a server (language model, speech
    to text, voice) stays there (it is not this machine's model to fall back from)."""
    cpu = load_settings("cpu")
    llm = settings.llm if settings.llm.backend == "openai" else cpu.llm
    asr = settings.asr if settings.asr.backend == "openai" else cpu.asr
    tts = settings.tts if settings.tts.engine == "openai" else cpu.tts
    return msgspec.structs.replace(settings, preset="cpu", asr=asr, llm=llm, tts=tts)


def load_engines(
    settings: Settings, *, fallback: bool = False, status: LoadStatus | None = None
) -> tuple[Settings, Engines]:
    """Load the chosen preset; when it was picked automatically and a gpu model cannot be had
    (no network on first launch), run the offline cpu preset instead of failing. A model that is
    there but does not fit (ModelMismatchError) is a wrong setting, never a reason to fall back."""
    try:
        return settings, load_and_warm(settings, status)
    except ModelError as exc:
        if not (fallback and settings.preset == "gpu"):
            raise
        log.warning("%s -- starting the offline cpu preset instead", exc)
        cpu = cpu_fallback(settings)
        return cpu, load_and_warm(cpu, status)


# ---------------------------------------------------------------- the loading thread


def one_line(exc: BaseException) -> str:
    """A failure as one line: our own errors say it all; others get their type name."""
    if isinstance(exc, SAYS_IT_ALL):
        return str(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class BackgroundLoad:
    """Loads (and warms up) the engines on a thread, so the port opens at once and answers "loading"
    while models download; `on_ready` hands the engines over, `on_failure` gets the one-line reason."""

    def __init__(
        self,
        settings: Settings,
        status: LoadStatus,
        *,
        fallback: bool = False,
        on_ready: Callable[[Settings, Engines], None],
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.status = status
        self.fallback = fallback
        self.on_ready = on_ready
        self.on_failure = on_failure
        self._lock = threading.Lock()
        self._closed = False
        self._engines: Engines | None = None
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            settings, engines = load_engines(self.settings, fallback=self.fallback, status=self.status)
        except Exception as exc:  # any failure must reach /health and `serve`, not end with the thread
            self._fail(exc)
            return
        with self._lock:
            if self._closed:  # the server stopped while the models loaded
                engines.close()
                return
            self._engines = engines
        self.on_ready(settings, engines)
        self.status.set("ready", f"ready: preset {settings.preset}")

    def _fail(self, exc: Exception) -> None:
        message = one_line(exc)
        if isinstance(exc, SAYS_IT_ALL):
            log.error("%s", message)
        else:
            log.exception("loading the models failed")
        self.status.set("failed", message)
        if self.on_failure is not None:
            self.on_failure(message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            engines, self._engines = self._engines, None
        if engines is not None:
            engines.close()
