"""Which voice speaks the replies, and each voice engine's own settings."""

from __future__ import annotations

from typing import Literal

import msgspec

from app.engines.speech_remote import RemoteVoiceSettings
from app.engines.tts.csm.settings import CsmSettings
from app.engines.tts.piper import PiperSettings


class TtsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # openai: the voice of an OpenAI-compatible audio server (tts.openai: base_url, api_key, model, voice)
    engine: Literal["piper", "csm", "openai"] = "piper"
    piper: PiperSettings = PiperSettings()
    csm: CsmSettings = CsmSettings()
    openai: RemoteVoiceSettings = RemoteVoiceSettings()

    def __post_init__(self) -> None:
        if self.engine == "openai" and not self.openai.base_url.startswith(("http://", "https://")):
            raise ValueError("tts openai.base_url must be the server's http:// or https:// address with engine openai")
