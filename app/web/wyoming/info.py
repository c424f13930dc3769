"""The server's `info`: what Home Assistant lists as its speech-to-text, text-to-speech and conversation agent."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)

from app.config import Settings
from app.engines.loaded import Engines
from app.web.voices import voice_language, voice_name

NAME = "voice-assistant"
ATTRIBUTION = Attribution(name="voice-assistant", url="https://github.com/")


def _version() -> str | None:
    try:
        return version("voice-assistant")
    except PackageNotFoundError:
        return None


def _short(reference: str) -> str:
    return reference.rstrip("/").rsplit("/", 1)[-1]


def server_info(settings: Settings, engines: Engines | None) -> Info:
    """Built from the settings (and, once loaded, the speech-to-text model's languages), so that it is answered at
    once also while the models load."""
    models, v = settings.models(), _version()
    asr_languages = engines.asr.languages if engines is not None else [settings.asr.language or "en"]
    # The language model is told nothing of a language: it answers in the one it is spoken to, as well as it can.
    text_language = settings.asr.language or "en"
    asr = AsrProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=v,
                     description="speech-to-text (faster-whisper)",
                     models=[AsrModel(name=_short(models["asr"]), attribution=ATTRIBUTION, installed=True,
                                      description=f"Whisper: {_short(models['asr'])}", version=v,
                                      languages=list(asr_languages))])
    voice = TtsVoice(name=voice_name(settings), attribution=ATTRIBUTION, installed=True, version=v,
                     description=voice_name(settings), languages=[voice_language(settings)])
    tts = TtsProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=v,
                     description=f"text-to-speech ({settings.tts.engine})", voices=[voice],
                     supports_synthesize_streaming=True)
    handle = HandleProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=v,
                           description="conversation agent (the assistant's language model)",
                           models=[HandleModel(name=_short(models["llm"]), attribution=ATTRIBUTION, installed=True,
                                               description=_short(models["llm"]), version=v,
                                               languages=[text_language])])
    return Info(asr=[asr], tts=[tts], handle=[handle])
