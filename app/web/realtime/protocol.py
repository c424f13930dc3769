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


class FunctionTool(msgspec.Struct):
    """A function the model may call; the client runs it and sends its output back as an item."""

    name: str
    type: str = "function"
    description: str = ""
    parameters: dict[str, Any] = {}


class NamedChoice(msgspec.Struct):
    """tool_choice naming one function: {"type": "function", "name": ...}."""

    name: str
    type: str = "function"


ToolChoice = str | NamedChoice  # "auto" | "none" | "required", or one function


class SessionConfig(msgspec.Struct):
    type: str = "realtime"
    instructions: str | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET
    max_output_tokens: int | str | UnsetType = UNSET  # a number, or "inf"


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
    transcript: str | None = None  # of input_audio or output_audio, when the client knows it


class ItemIn(msgspec.Struct):
    """Any item a client may create: a message (user, assistant, system), a function call, or its output."""

    type: str = "message"
    role: str | None = None
    content: list[ContentIn] = []
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None
    status: str | None = None  # ignored: an item the client adds is complete


class ItemCreate(msgspec.Struct, tag="conversation.item.create"):
    item: ItemIn
    event_id: str | None = None
    previous_item_id: str | None = None


class ItemTruncate(msgspec.Struct, tag="conversation.item.truncate"):
    item_id: str
    audio_end_ms: int
    content_index: int = 0
    event_id: str | None = None


class ItemRetrieve(msgspec.Struct, tag="conversation.item.retrieve"):
    item_id: str
    event_id: str | None = None


class ItemDelete(msgspec.Struct, tag="conversation.item.delete"):
    item_id: str
    event_id: str | None = None


class ItemReference(msgspec.Struct, tag="item_reference"):
    id: str


class ResponseParams(msgspec.Struct):
    conversation: str | None = None  # "auto" (the default) or "none": out of band
    input: list[ItemIn] | None = None  # the context of an out-of-band response (items or item_reference)
    instructions: str | None = None
    output_modalities: list[str] | None = None
    metadata: dict[str, str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    max_output_tokens: int | str | None = None
    audio: Any = None  # its output voice and format: the session's are used


class ResponseCreate(msgspec.Struct, tag="response.create"):
    response: ResponseParams | None = None
    event_id: str | None = None


class ResponseCancel(msgspec.Struct, tag="response.cancel"):
    response_id: str | None = None
    event_id: str | None = None


ClientEvent = (
    SessionUpdate | BufferAppend | BufferCommit | BufferClear | ItemCreate | ItemTruncate | ItemRetrieve
    | ItemDelete | ResponseCreate | ResponseCancel
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
    tools: list[FunctionTool] = msgspec.field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    max_output_tokens: int | str = "inf"


class Content(msgspec.Struct, omit_defaults=True):
    """One content part of an item: input_text, input_audio (user, system), output_text or output_audio
    (assistant)."""

    type: str
    text: str | None = None
    transcript: str | None = None


ItemStatus = Literal["completed", "incomplete", "in_progress"]


class Item(msgspec.Struct):
    id: str
    role: Literal["user", "assistant", "system"]
    content: list[Content]
    status: ItemStatus = "completed"
    type: str = "message"
    object: str = "realtime.item"


class CallItem(msgspec.Struct):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"
    type: str = "function_call"
    object: str = "realtime.item"


class CallOutputItem(msgspec.Struct):
    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"
    type: str = "function_call_output"
    object: str = "realtime.item"


AnyItem = Item | CallItem | CallOutputItem


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


class InputDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0
    cached_tokens: int = 0


class OutputDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    """Tokens of one response: the text ones counted by the language model, the audio ones estimated
    (app/web/realtime/usage.py says how)."""

    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_token_details: InputDetails
    output_token_details: OutputDetails


class ResponseInfo(msgspec.Struct):
    id: str
    status: Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]
    output: list[AnyItem]
    conversation_id: str | None
    status_details: StatusDetails | None = None
    object: str = "realtime.response"
    output_modalities: list[str] = msgspec.field(default_factory=lambda: ["audio"])
    max_output_tokens: int | str = "inf"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] | None = None


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
    item: AnyItem
    previous_item_id: str | None = None


class ItemDone(ServerEvent, tag="conversation.item.done"):
    item: AnyItem
    previous_item_id: str | None = None


class ItemRetrieved(ServerEvent, tag="conversation.item.retrieved"):
    item: AnyItem


class ItemDeleted(ServerEvent, tag="conversation.item.deleted"):
    item_id: str


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
    item: AnyItem
    output_index: int = 0


class OutputItemDone(ServerEvent, tag="response.output_item.done"):
    response_id: str
    item: AnyItem
    output_index: int = 0


class Part(msgspec.Struct, omit_defaults=True):
    type: str  # audio or text
    transcript: str | None = None  # of audio
    text: str | None = None  # of text


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


class TextDelta(InContent, tag="response.output_text.delta", kw_only=True):
    delta: str


class TextDone(InContent, tag="response.output_text.done", kw_only=True):
    text: str


class ArgumentsDelta(ServerEvent, tag="response.function_call_arguments.delta"):
    response_id: str
    item_id: str
    call_id: str
    delta: str
    output_index: int = 0


class ArgumentsDone(ServerEvent, tag="response.function_call_arguments.done"):
    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str
    output_index: int = 0


class Error(ServerEvent, tag="error"):
    error: ErrorInfo


_encoder = msgspec.json.Encoder()


def encode(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()
