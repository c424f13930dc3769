"""The voice names every wire protocol shows and takes: the loaded voice's own name, and the names that OpenAI's
clients send by default, which speak with it too (a server with one voice has nothing else to give them)."""

from __future__ import annotations

from app.config import Settings

# OpenAI's built-in voices: Open WebUI, LibreChat and Home Assistant's OpenAI TTS send one of these unless told.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
DEFAULT = "default"


def voice_name(settings: Settings) -> str:
    """The loaded voice, as a person would name it: Piper's voice file (en_US-joe-medium), CSM's repository."""
    reference = settings.models()["tts"]
    name = reference.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".onnx")


def known_voice(settings: Settings, wanted: str | None) -> bool:
    """Whether `wanted` names this server's voice (None and "" ask for the default)."""
    return not wanted or wanted in (voice_name(settings), DEFAULT, *OPENAI_VOICES)


def voice_language(settings: Settings) -> str:
    """The voice's language as Home Assistant names languages (en_US), from a Piper file's name; English else."""
    head = voice_name(settings).split("-", 1)[0]
    return head if len(head) == 5 and head[2] == "_" else "en_US"
