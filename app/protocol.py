"""Every message of the WebSocket contract, as msgspec Structs (the README documents them).

Client -> server: text frames carry one JSON control message; binary frames carry the recorded
audio stream (the container named by the last `audio_start`, e.g. WebM/Opus).
Server -> client: text frames carry one JSON event; binary frames carry reply audio as raw
mono PCM, signed 16-bit little-endian, at the sample rate announced in `ready`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# ---------------------------------------------------------------- client -> server


Mode = Literal["hands_free", "push_to_talk"]


class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True):
    """Optional, any time: per-session options (sent again when the user changes a setting)."""

    system_prompt: str | None = None
    temperature: float | None = None
    end_silence_ms: int | None = None  # silence that ends a spoken turn (server default: 600)
    # hands_free: the server ends turns by itself after end_silence_ms of silence;
    # push_to_talk: a turn is exactly the audio between audio_start and audio_stop.
    mode: Mode = "hands_free"
    speaker: int | None = None  # voice of engines that have several (CSM speaker id)

    def __post_init__(self) -> None:
        if self.end_silence_ms is not None and not 100 <= self.end_silence_ms <= 5000:
            raise ValueError("end_silence_ms must be between 100 and 5000")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if self.system_prompt is not None and len(self.system_prompt) > 4000:
            raise ValueError("system_prompt is longer than 4000 characters")


class AudioStart(msgspec.Struct, tag="audio_start", forbid_unknown_fields=True):
    """A new recording begins; the binary frames that follow are one stream in this format."""

    mime_type: str = "audio/webm;codecs=opus"


class AudioStop(msgspec.Struct, tag="audio_stop", forbid_unknown_fields=True):
    """The user stopped the microphone: whatever was said so far ends the turn now."""


class UserText(msgspec.Struct, tag="text", forbid_unknown_fields=True):
    """Typed input instead of speech."""

    text: str

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("text is empty")
        if len(self.text) > 2000:
            raise ValueError("text is longer than 2000 characters")


class Interrupt(msgspec.Struct, tag="interrupt", forbid_unknown_fields=True):
    """Stop the reply in progress (its turn ends with reason "interrupted").

    played_samples: how much of the reply's audio the page actually played, so that the history
    keeps only what the user heard; without it the server estimates from its own clock.
    """

    played_samples: int | None = None


class Reset(msgspec.Struct, tag="reset", forbid_unknown_fields=True):
    """Forget the conversation so far."""


ClientMessage = Hello | AudioStart | AudioStop | UserText | Interrupt | Reset

# ---------------------------------------------------------------- server -> client

State = Literal["idle", "listening", "thinking", "speaking"]
EndReason = Literal["completed", "no_speech", "interrupted", "error"]


class Ready(msgspec.Struct, tag="ready"):
    """Sent once on connect: the reply audio format and what is loaded."""

    session_id: str
    sample_rate: int
    preset: str
    asr: str
    llm: str
    tts: str
    channels: int = 1
    sample_format: str = "s16le"


class StateChanged(msgspec.Struct, tag="state"):
    state: State


class SpeechStarted(msgspec.Struct, tag="speech_started"):
    """Voice activity began in the microphone stream; `turn` is the id the user's turn will have.

    Arriving while reply audio plays, it means barge-in: the page stops playback at once; the
    server cancels that reply and its turn_end (reason "interrupted") follows.
    """

    turn: int


class SpeechStopped(msgspec.Struct, tag="speech_stopped"):
    """The user's turn is over (silence long enough, audio_stop, or the length cap)."""


class Transcript(msgspec.Struct, tag="transcript"):
    """final=False: an interim guess while the user is still speaking; the final one replaces it."""

    turn: int
    text: str
    final: bool = True


class ReplyText(msgspec.Struct, tag="reply_text"):
    """One more piece of the assistant's reply text, in order, as the LLM streams it."""

    turn: int
    delta: str


class ReplyAudioStart(msgspec.Struct, tag="audio_start"):
    """Binary PCM frames of this turn follow, until `audio_end`."""

    turn: int
    sample_rate: int


class ReplyAudioEnd(msgspec.Struct, tag="audio_end"):
    turn: int
    samples: int  # total PCM samples sent for this turn


class TurnMetrics(msgspec.Struct, tag="metrics"):
    """Milliseconds from the end of the user's speech (or the typed message) to each stage."""

    turn: int
    end_of_turn_ms: float | None = None
    transcript_ms: float | None = None
    first_token_ms: float | None = None
    first_phrase_ms: float | None = None
    first_audio_ms: float | None = None  # voice-to-voice latency
    total_ms: float | None = None


class TurnEnd(msgspec.Struct, tag="turn_end"):
    """Every turn ends with exactly one of these, whatever happened."""

    turn: int
    reason: EndReason
    reply: str = ""  # the reply text as spoken (may be partial)


class Error(msgspec.Struct, tag="error"):
    """Something went wrong; `message` is meant for the person using the page."""

    code: str
    message: str
    turn: int | None = None


ServerEvent = (
    Ready
    | StateChanged
    | SpeechStarted
    | SpeechStopped
    | Transcript
    | ReplyText
    | ReplyAudioStart
    | ReplyAudioEnd
    | TurnMetrics
    | TurnEnd
    | Error
)

_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


def decode_client(data: str | bytes) -> ClientMessage:
    """Parse one control message; raises msgspec.ValidationError/DecodeError on bad input."""
    return _decoder.decode(data)


def encode_event(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()
