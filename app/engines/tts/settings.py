"""Which voice speaks the replies, and each voice engine's own settings."""

from __future__ import annotations

from typing import Literal

import msgspec

from app.engines.tts.csm.settings import CsmSettings
from app.engines.tts.piper import PiperSettings


class TtsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    engine: Literal["piper", "csm"] = "piper"
    piper: PiperSettings = PiperSettings()
    csm: CsmSettings = CsmSettings()
