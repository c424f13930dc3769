"""Every message of the WebSocket contract, as msgspec Structs (docs/protocol.md documents them).

Client -> server: text frames carry one JSON control message; binary frames carry the recorded
audio stream (the container named by the last `audio_start`, e.g. WebM/Opus).
Server -> client: text frames carry one JSON event; binary frames carry reply audio as raw
mono PCM, signed 16-bit little-endian, at the sample rate announced in `ready`.
"""

from __future__ import annotations

import msgspec

from app.core import events as ev

# ---------------------------------------------------------------- client -> server


class Hello(ev.Options, tag="hello", forbid_unknown_fields=True):
    """Optional, any time: the conversation's options (sent again when the user changes a setting)."""


class AudioStart(msgspec.Struct, tag="audio_start", forbid_unknown_fields=True):
    """A new recording begins; the binary frames that follow are one stream in this format."""

    mime_type: str = "audio/webm;codecs=opus"

    @property
    def container(self) -> str | None:
        """FFmpeg's demuxer for `mime_type` ("audio/ogg; codecs=opus" -> "ogg"); None: not one we read."""
        return CONTAINERS.get(self.mime_type.split(";")[0].strip().lower())


# The containers a recording may be in (by MIME type, without parameters such as codecs), as FFmpeg's
# demuxer that opens it: what browsers record (Chromium WebM, Firefox and the page's own writer Ogg, Safari
# MP4), and WAV. The decoder opens only the one declared; FFmpeg never guesses from a client's bytes.
CONTAINERS = {"audio/webm": "webm", "audio/ogg": "ogg", "audio/mp4": "mp4",
              "audio/wav": "wav", "audio/wave": "wav", "audio/x-wav": "wav"}


class AudioStop(msgspec.Struct, tag="audio_stop", forbid_unknown_fields=True):
    """The user stopped the microphone: whatever was said so far ends the turn now."""


class UserText(msgspec.Struct, tag="text", forbid_unknown_fields=True):
    """Typed input instead of speech."""

    text: str

    def __post_init__(self) -> None:
        if not self.text.strip():  # its longest length is a setting (limits.max_text_chars)
            raise ValueError("text is empty")


class Interrupt(msgspec.Struct, tag="interrupt", forbid_unknown_fields=True):
    """Stop the reply in progress (its turn ends with reason "interrupted").

    played_samples: how much of the reply's audio the page actually played, so that the history
    keeps only what the user heard; without it the server estimates from its own clock.
    """

    played_samples: int | None = None


class Reset(msgspec.Struct, tag="reset", forbid_unknown_fields=True):
    """Forget the conversation so far."""


class Ping(msgspec.Struct, tag="ping", forbid_unknown_fields=True):
    """The page's heartbeat: answered by a `pong` at once. A socket left half-open (a laptop that slept, a
    phone that changed networks) still looks open to the browser; no pong tells the page so. It is not use:
    the idle clock (limits.idle_timeout_s) runs on."""


ClientMessage = Hello | AudioStart | AudioStop | UserText | Interrupt | Reset | Ping

# ---------------------------------------------------------------- server -> client

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


# The core's events (app/core/events.py) go out as JSON objects of their fields, named by "type";
# ReplyAudio goes out as binary frames of raw PCM instead.
EVENT_TYPES: dict[type, str] = {
    ev.StateChanged: "state", ev.SpeechStarted: "speech_started", ev.SpeechStopped: "speech_stopped",
    ev.BargeIn: "barge_in",
    ev.Transcript: "transcript", ev.ReplyText: "reply_text", ev.ReplyCall: "reply_call",
    ev.ReplyAudioStart: "audio_start",
    ev.ReplyAudioEnd: "audio_end", ev.TurnMetrics: "metrics", ev.TurnEnd: "turn_end", ev.Error: "error",
}


class Pong(msgspec.Struct, tag="pong"):
    """The answer to a `ping`, sent ahead of the events still queued (it says the socket works, nothing more)."""


ServerEvent = Ready | Pong | ev.Event

_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


def decode_client(data: str | bytes) -> ClientMessage:
    """Parse one control message; raises msgspec.ValidationError/DecodeError on bad input."""
    return _decoder.decode(data)


def encode_event(event: ServerEvent) -> str:
    if isinstance(event, Ready | Pong):
        return _encoder.encode(event).decode()
    return _encoder.encode({"type": EVENT_TYPES[type(event)], **msgspec.structs.asdict(event)}).decode()
