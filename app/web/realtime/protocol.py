"""The OpenAI Realtime protocol's messages (GA event names) that `/v1/realtime` speaks, as msgspec Structs.

Names and shapes follow the `openai` SDK's `openai.types.realtime` models, which parse what we send;
fields a client may send that we do not act on are accepted and ignored, unless ignoring them would
change what the client gets (those are refused in app/web/realtime/session.py with an `error`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

RATE = 24_000  # the only audio/pcm rate of the protocol, both ways (G.711's is 8 kHz)

# ---------------------------------------------------------------- client -> server


class AudioFormat(msgspec.Struct):
    type: str = "audio/pcm"
    rate: int | None = None


Eagerness = Literal["low", "medium", "high", "auto"]


class TurnDetection(msgspec.Struct, frozen=True):
    """server_vad or semantic_vad: our own end-of-turn detector either way. server_vad's silence, or
    semantic_vad's eagerness, sets how long it waits when unsure (app/web/realtime/session.py); both may
    leave the response (create_response) or barge-in (interrupt_response) to the client."""

    type: Literal["server_vad", "semantic_vad"]
    silence_duration_ms: int | None = None  # server_vad only
    eagerness: Eagerness | None = None  # semantic_vad only
    create_response: bool = True
    interrupt_response: bool = True


class Transcription(msgspec.Struct):
    model: str | None = None
    language: str | None = None


class AudioInputConfig(msgspec.Struct):
    format: AudioFormat | UnsetType = UNSET
    # null: manual commits; absent: unchanged
    turn_detection: TurnDetection | None | UnsetType = UNSET
    transcription: Transcription | None | UnsetType = UNSET


class AudioOutputConfig(msgspec.Struct):
    format: AudioFormat | UnsetType = UNSET
    voice: str | dict[str, Any] | UnsetType = UNSET


class AudioConfig(msgspec.Struct):
    input: AudioInputConfig | UnsetType = UNSET
    output: AudioOutputConfig | UnsetType = UNSET


class SessionConfig(msgspec.Struct):
    type: str = "realtime"
    instructions: str | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    tools: list[Any] | UnsetType = UNSET


class SessionUpdate(msgspec.Struct, tag="session.update"):
    session: SessionConfig
    event_id: str | None = None


class BufferAppend(msgspec.Struct, tag="input_audio_buffer.append"):
    audio: str  # base64, in the session's input format (app/web/realtime/formats.py)
    event_id: str | None = None


class BufferCommit(msgspec.Struct, tag="input_audio_buffer.commit"):
    event_id: str | None = None


class BufferClear(msgspec.Struct, tag="input_audio_buffer.clear"):
    event_id: str | None = None


class ContentIn(msgspec.Struct):
    type: str
    text: str | None = None
    audio: str | None = None  # base64, for input_audio


class ItemIn(msgspec.Struct):
    role: str
    content: list[ContentIn]
    type: str = "message"
    id: str | None = None


class ItemCreate(msgspec.Struct, tag="conversation.item.create"):
    item: ItemIn
    event_id: str | None = None
    previous_item_id: str | None = None


class ItemTruncate(msgspec.Struct, tag="conversation.item.truncate"):
    item_id: str
    audio_end_ms: int
    content_index: int = 0
    event_id: str | None = None


class ResponseParams(msgspec.Struct):
    conversation: str | None = None
    input: list[Any] | None = None


class ResponseCreate(msgspec.Struct, tag="response.create"):
    response: ResponseParams | None = None
    event_id: str | None = None


class ResponseCancel(msgspec.Struct, tag="response.cancel"):
    response_id: str | None = None
    event_id: str | None = None


ClientEvent = (
    SessionUpdate | BufferAppend | BufferCommit | BufferClear | ItemCreate | ItemTruncate | ResponseCreate
    | ResponseCancel
)


class Envelope(msgspec.Struct):
    """What any event has: read when an event is not understood, to say which one in the error."""

    type: Any = None
    event_id: Any = None


_decoder = msgspec.json.Decoder(ClientEvent)
_envelope = msgspec.json.Decoder(Envelope)


def decode_client(data: str | bytes) -> ClientEvent:
    """Parse one client event; raises msgspec.ValidationError/DecodeError on bad input."""
    return _decoder.decode(data)


def envelope(data: str | bytes) -> Envelope:
    """The type and event_id of a message that did not parse whole (empty when it is not JSON at all)."""
    try:
        found = _envelope.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Envelope()
    return Envelope(*(v if isinstance(v, str) else None for v in (found.type, found.event_id)))


# ---------------------------------------------------------------- shared shapes of server events


class Format(msgspec.Struct):
    type: str = "audio/pcm"
    rate: int = RATE


class VadInfo(msgspec.Struct):
    type: str = "server_vad"
    silence_duration_ms: int | None = None
    create_response: bool = True
    interrupt_response: bool = True


class SemanticVadInfo(msgspec.Struct):
    type: str = "semantic_vad"
    eagerness: Eagerness = "auto"
    create_response: bool = True
    interrupt_response: bool = True


class InputInfo(msgspec.Struct):
    format: Format
    turn_detection: VadInfo | SemanticVadInfo | None
    transcription: Transcription | None
    noise_reduction: None = None


class OutputInfo(msgspec.Struct):
    format: Format
    voice: str | dict[str, Any]
    speed: float = 1.0


class AudioInfo(msgspec.Struct):
    input: InputInfo
    output: OutputInfo


class SessionInfo(msgspec.Struct):
    """The effective session, as session.created / session.updated show it."""

    id: str
    model: str
    instructions: str
    audio: AudioInfo
    type: str = "realtime"
    object: str = "realtime.session"
    output_modalities: list[str] = msgspec.field(default_factory=lambda: ["audio"])
    tools: list[Any] = msgspec.field(default_factory=list)
    tool_choice: str = "auto"
    max_output_tokens: int | str = "inf"


class Content(msgspec.Struct, omit_defaults=True):
    """One content part of an item: input_text, input_audio (user) or output_audio (assistant)."""

    type: str
    text: str | None = None
    transcript: str | None = None


class Item(msgspec.Struct):
    id: str
    role: Literal["user", "assistant"]
    content: list[Content]
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    type: str = "message"
    object: str = "realtime.item"


class ErrorInfo(msgspec.Struct):
    type: str  # invalid_request_error (the client's event) or server_error (ours)
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event it answers


class StatusDetails(msgspec.Struct, omit_defaults=True):
    type: str
    reason: str | None = None
    error: ErrorInfo | None = None


class ResponseInfo(msgspec.Struct):
    id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    output: list[Item]
    conversation_id: str
    status_details: StatusDetails | None = None
    object: str = "realtime.response"
    output_modalities: list[str] = msgspec.field(default_factory=lambda: ["audio"])
    max_output_tokens: int | str = "inf"
    usage: None = None
    metadata: None = None


class Usage(msgspec.Struct):
    seconds: float
    type: str = "duration"


# ---------------------------------------------------------------- server -> client
# Each carries its own `event_id`, given when it is sent (app/web/realtime/session.py).


class ServerEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str = ""


class SessionCreated(ServerEvent, tag="session.created"):
    session: SessionInfo


class SessionUpdated(ServerEvent, tag="session.updated"):
    session: SessionInfo


class SpeechStarted(ServerEvent, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str


class Committed(ServerEvent, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None = None


class Cleared(ServerEvent, tag="input_audio_buffer.cleared"):
    pass


class ItemAdded(ServerEvent, tag="conversation.item.added"):
    item: Item
    previous_item_id: str | None = None


class ItemDone(ServerEvent, tag="conversation.item.done"):
    item: Item
    previous_item_id: str | None = None


class ItemTruncated(ServerEvent, tag="conversation.item.truncated"):
    item_id: str
    content_index: int
    audio_end_ms: int


class TranscriptionDelta(ServerEvent, tag="conversation.item.input_audio_transcription.delta"):
    item_id: str
    delta: str
    content_index: int = 0


class TranscriptionCompleted(ServerEvent, tag="conversation.item.input_audio_transcription.completed"):
    item_id: str
    transcript: str
    usage: Usage
    content_index: int = 0


class ResponseCreated(ServerEvent, tag="response.created"):
    response: ResponseInfo


class ResponseDone(ServerEvent, tag="response.done"):
    response: ResponseInfo


class OutputItemAdded(ServerEvent, tag="response.output_item.added"):
    response_id: str
    item: Item
    output_index: int = 0


class OutputItemDone(ServerEvent, tag="response.output_item.done"):
    response_id: str
    item: Item
    output_index: int = 0


class Part(msgspec.Struct):
    type: str = "audio"
    transcript: str = ""


class InContent(ServerEvent):
    """An event about the content part of a response's output item (one item, one part here).
    Its kind's own fields follow these defaults, so each kind is kw_only too."""

    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class PartAdded(InContent, tag="response.content_part.added", kw_only=True):
    part: Part


class PartDone(InContent, tag="response.content_part.done", kw_only=True):
    part: Part


class AudioDelta(InContent, tag="response.output_audio.delta", kw_only=True):
    delta: str  # base64, in the session's output format (app/web/realtime/formats.py)


class AudioDone(InContent, tag="response.output_audio.done", kw_only=True):
    pass


class TranscriptDelta(InContent, tag="response.output_audio_transcript.delta", kw_only=True):
    delta: str


class TranscriptDone(InContent, tag="response.output_audio_transcript.done", kw_only=True):
    transcript: str


class Error(ServerEvent, tag="error"):
    error: ErrorInfo


_encoder = msgspec.json.Encoder()


def encode(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()
