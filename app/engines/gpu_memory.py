"""How much GPU memory each model takes, logged once at start-up (app/startup.py measures every load and
the warm-up with it; on CPU it does nothing and never imports torch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)


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
    def probe(cls) -> GpuMemory | None:
        """A meter when CUDA is there; else None. Ask only when a model is meant for the GPU: this
        imports torch."""
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


def measured(gpu: GpuMemory | None, name: str) -> AbstractContextManager[None]:
    """`gpu.measure(name)`, or nothing to do without a meter."""
    return gpu.measure(name) if gpu is not None else nullcontext()
