"""The loaded models of one server, shared by every session, each behind its own worker thread;
and how they get there: fetch, load, warm up (on a background thread at start-up), GPU memory per model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import msgspec

from . import models
from .asr import Transcriber
from .config import ConfigError, Settings, load_settings
from .llm import ChatModel
from .loading import LoadStatus, Phase
from .models import ModelError
from .tts.base import TtsEngine
from .tts.piper import PiperEngine
from .turns import load_vad_model
from .workers import Worker

log = logging.getLogger(__name__)

SLOT_NAMES = {"asr": "speech-to-text model", "llm": "language model", "tts": "voice"}


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
    def load(cls, settings: Settings, status: LoadStatus | None = None) -> Engines:
        """Fetch, load and warm up every model (blocking: call it from a thread at start-up).

        Every file is fetched before any model loads, so a missing one fails in seconds, not after
        a GPU load; the warm-up makes the first real turn as fast as the rest.
        """
        status = status or LoadStatus()
        gpu = GpuMemory.probe(settings)
        local = fetch_models(settings, status)
        loaders: dict[str, Callable[[], Any]] = {
            "asr": lambda: Transcriber.load(local.asr),
            "llm": lambda: ChatModel.load(local.llm),
            "tts": lambda: load_tts(local),
        }
        loaded = {}
        for slot, load in loaders.items():
            _announce(status, "loading", slot)
            with _measured(gpu, slot):
                loaded[slot] = load()
        engines = cls(settings, **loaded)
        with _measured(gpu, "warm-up"):
            engines.warm_up(status)
        if gpu is not None:
            gpu.report()
        return engines

    def warm_up(self, status: LoadStatus | None = None) -> None:
        """One short pass through each model: first-call kernels, allocator, caches."""
        for name, model in (("asr", self.asr), ("llm", self.llm), ("tts", self.tts)):
            t0 = time.perf_counter()
            _announce(status, "warming", name)
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
        from .tts.csm.engine import (
            load_csm_engine,  # imports torch: only when CSM is wanted
        )

        return load_csm_engine(settings.tts.csm)
    return PiperEngine.load(settings.tts.piper)


# ---------------------------------------------------------------- fetching (downloads) before loading


def fetch_models(settings: Settings, status: LoadStatus) -> Settings:
    """Put every model file on disk (hub downloads report to `status`); returns the settings with the
    asr and llm references replaced by the local paths, so loading them touches no network."""
    status.set("loading", "checking the model files")
    asr = models.resolve(settings.asr.model, "asr", status)
    llm = models.resolve(settings.llm.model, "llm", status)
    if settings.tts.engine == "csm":
        _fetch_csm(settings, status)
    return msgspec.structs.replace(
        settings,
        asr=msgspec.structs.replace(settings.asr, model=str(asr)),
        llm=msgspec.structs.replace(settings.llm, model=str(llm)),
    )


def _fetch_csm(settings: Settings, status: LoadStatus) -> None:
    """CSM's files, through the CSM loader's own resolve_files (load_csm_engine finds them in the cache afterwards)."""
    from .tts.csm import loader  # imports torch: only when CSM is wanted

    loader.resolve_files(settings.tts.csm, status)


def _announce(status: LoadStatus | None, phase: Phase, slot: str) -> None:
    if status is not None:
        verb = "warming up" if phase == "warming" else "loading"
        status.set(phase, f"{verb} the {SLOT_NAMES[slot]}")


# ---------------------------------------------------------------- GPU memory per model


def uses_gpu(settings: Settings) -> bool:
    return settings.asr.device != "cpu" or settings.llm.n_gpu_layers != 0 or settings.tts.engine == "csm"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class GpuMemory:
    """Device-wide GPU memory in use, read around each load. llama.cpp and CTranslate2 allocate
    outside torch, so torch's own counters would miss them: the driver's free/total figures
    (mem_get_info) see every model; torch's allocated bytes are logged beside them for CSM."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.total = torch.cuda.mem_get_info()[1]  # the first call makes the CUDA context...
        self.baseline = self.used()  # ...so the context is not counted as a model's
        self.per_model: dict[str, int] = {}

    @classmethod
    def probe(cls, settings: Settings) -> GpuMemory | None:
        """A meter when a model is meant for the GPU and CUDA is there; else None (no torch import)."""
        if not uses_gpu(settings):
            return None
        try:
            import torch
        except ImportError:
            return None
        if not torch.cuda.is_available():
            log.info("no CUDA GPU: skipping the GPU memory figures")
            return None
        return cls(torch)

    def used(self) -> int:
        free, total = self._torch.cuda.mem_get_info()
        return total - free

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        before, tensors = self.used(), self._torch.cuda.memory_allocated()
        yield
        self._torch.cuda.synchronize()
        self.per_model[name] = self.used() - before
        log.info(
            "gpu memory: %s took %s (torch tensors %s); %s of %s in use",
            name, _gb(self.per_model[name]), _gb(self._torch.cuda.memory_allocated() - tensors),
            _gb(self.used()), _gb(self.total),
        )

    def report(self) -> None:
        parts = ", ".join(f"{name} {_gb(n)}" for name, n in self.per_model.items())
        log.info(
            "gpu memory after warm-up: %s; %s of %s in use (CUDA context and other processes: %s)",
            parts, _gb(self.used()), _gb(self.total), _gb(self.baseline),
        )


def _measured(gpu: GpuMemory | None, name: str) -> AbstractContextManager[None]:
    return gpu.measure(name) if gpu is not None else nullcontext()


# ---------------------------------------------------------------- start-up: fallback and background load


def cpu_fallback(settings: Settings) -> Settings:
    """The same server settings with the offline cpu preset's models."""
    cpu = load_settings("cpu")
    return msgspec.structs.replace(settings, preset="cpu", asr=cpu.asr, llm=cpu.llm, tts=cpu.tts)


def load_engines(
    settings: Settings, *, fallback: bool = False, status: LoadStatus | None = None
) -> tuple[Settings, Engines]:
    """Load the chosen preset; when it was picked automatically and a gpu model cannot be had
    (no network on first launch), run the offline cpu preset instead of failing."""
    try:
        return settings, Engines.load(settings, status)
    except ModelError as exc:
        if not (fallback and settings.preset == "gpu"):
            raise
        log.warning("%s -- starting the offline cpu preset instead", exc)
        cpu = cpu_fallback(settings)
        return cpu, Engines.load(cpu, status)


def one_line(exc: BaseException) -> str:
    """A failure as one line: our own errors say it all; others get their type name."""
    if isinstance(exc, (ModelError, ConfigError)):
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
        if isinstance(exc, (ModelError, ConfigError)):
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
