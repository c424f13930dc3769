"""Every model file on disk before any model loads, so a missing one fails in seconds, not after a
GPU load. models.py resolves each reference (package file, local path, hub download with progress to
the start-up status); CSM's three references go through its own loader's resolve_files, the same
function its engine loads from. Next: app/startup.py loads each model from the local paths found here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import msgspec

from app.engines import models
from app.engines.asr import AsrSettings
from app.engines.llm import LlmSettings
from app.engines.loading import LoadStatus
from app.engines.tts.settings import TtsSettings

if TYPE_CHECKING:
    from app.engines.tts.csm.loader import CsmFiles


class LocalModels(NamedTuple):
    """What loading needs, all on disk: nothing in it reaches the network."""

    asr: AsrSettings  # the reference replaced by its local path
    llm: LlmSettings  # likewise, for a model in this process (backend llama_cpp)
    tts: TtsSettings  # as given: Piper resolves its own file
    csm: CsmFiles | None  # CSM's files, when the voice is CSM


def fetch_models(asr: AsrSettings, llm: LlmSettings, tts: TtsSettings, status: LoadStatus) -> LocalModels:
    """Put every model file on disk; hub downloads report their progress to `status`."""
    status.set("loading", "checking the model files")
    # With backend openai, asr.model is the name a server serves it under: nothing to fetch here.
    if asr.backend == "faster_whisper":
        asr = msgspec.structs.replace(asr, model=str(models.resolve(asr.model, "asr", status)))
    # With backend openai, llm.model is the name a server serves it under: nothing to fetch here.
    if llm.backend == "llama_cpp":
        llm = msgspec.structs.replace(llm, model=str(models.resolve(llm.model, "llm", status)))
    csm = _fetch_csm(tts, status) if tts.engine == "csm" else None
    return LocalModels(asr, llm, tts, csm)


def _fetch_csm(tts: TtsSettings, status: LoadStatus) -> CsmFiles:
    from app.engines.tts.csm import loader  # imports torch: only when CSM is wanted

    return loader.resolve_files(tts.csm, status)
