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
ATTRIBUTION = Attribution(name="voice-assistant (this server)", url="")
# Who made the models (Home Assistant shows it with each).
MADE_BY = {"asr": Attribution(name="OpenAI Whisper, run by faster-whisper",
                              url="https://github.com/SYSTRAN/faster-whisper"),
           "piper": Attribution(name="Piper", url="https://github.com/rhasspy/piper"),
           "csm": Attribution(name="Sesame CSM", url="https://github.com/SesameAILabs/csm"),
           "llm": Attribution(name="llama.cpp", url="https://github.com/ggml-org/llama.cpp")}


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
                     models=[AsrModel(name=_short(models["asr"]), attribution=MADE_BY["asr"], installed=True,
                                      description=f"Whisper: {_short(models['asr'])}", version=v,
                                      languages=list(asr_languages))])
    made_by = MADE_BY.get(settings.tts.engine, ATTRIBUTION)
    voice = TtsVoice(name=voice_name(settings), attribution=made_by, installed=True, version=v,
                     description=voice_name(settings), languages=[voice_language(settings)])
    tts = TtsProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=v,
                     description=f"text-to-speech ({settings.tts.engine})", voices=[voice],
                     supports_synthesize_streaming=True)
    llm_by = MADE_BY["llm"] if settings.llm.backend == "llama_cpp" else ATTRIBUTION
    handle = HandleProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=v,
                           description="conversation agent (the assistant's language model)",
                           models=[HandleModel(name=_short(models["llm"]), attribution=llm_by, installed=True,
                                               description=_short(models["llm"]), version=v,
                                               languages=[text_language])])
    return Info(asr=[asr], tts=[tts], handle=[handle])
