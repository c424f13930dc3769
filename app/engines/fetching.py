"""Every model file on disk before any model loads, so a missing one fails in seconds, not after a
GPU load. models.py resolves each reference (package file, local path, hub download with progress to
the start-up status); CSM's three references go through its own loader's resolve_files, the same
function its engine loads from. Next: startup.py loads each model from the local paths found here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import msgspec

from app.engines import models
from app.config import Settings
from app.engines.loading import LoadStatus

if TYPE_CHECKING:
    from app.engines.tts.csm.loader import CsmFiles


class LocalModels(NamedTuple):
    """What loading needs, all on disk: nothing in it reaches the network."""

    settings: Settings  # the asr and llm references replaced by their local paths
    csm: CsmFiles | None  # CSM's files, when the voice is CSM


def fetch_models(settings: Settings, status: LoadStatus) -> LocalModels:
    """Put every model file on disk; hub downloads report their progress to `status`."""
    status.set("loading", "checking the model files")
    asr = models.resolve(settings.asr.model, "asr", status)
    # With backend openai, llm.model is the name a server serves it under: nothing to fetch here.
    llm = models.resolve(settings.llm.model, "llm", status) if settings.llm.backend == "llama_cpp" else None
    csm = _fetch_csm(settings, status) if settings.tts.engine == "csm" else None
    local = msgspec.structs.replace(
        settings,
        asr=msgspec.structs.replace(settings.asr, model=str(asr)),
        llm=settings.llm if llm is None else msgspec.structs.replace(settings.llm, model=str(llm)),
    )
    return LocalModels(local, csm)


def _fetch_csm(settings: Settings, status: LoadStatus) -> CsmFiles:
    from app.engines.tts.csm import loader  # imports torch: only when CSM is wanted

    return loader.resolve_files(settings.tts.csm, status)
