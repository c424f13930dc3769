"""conversation.item.* and response.*: the items the client adds, reads and deletes, and the responses it
asks for, each one turn of the conversation core."""

from __future__ import annotations

import msgspec
import numpy as np

from app.audio import ASR_RATE
from app.core import events as ev
from app.core.conversation import Conversation
from app.core.limits import LimitSettings
from app.engines.tools import Tool, ToolSet
from app.web.realtime import protocol as rt
from app.web.realtime.audio_in import InputAudio
from app.web.realtime.errors import Refused
from app.web.realtime.history import Entry, History
from app.web.realtime.replies import Replies, Response, new_id


class Items:
    """The conversation's items, the audio ones waiting for a response, and the client's ways to answer,
    cancel and truncate. `defaults` gives the session's settings for a response (tools, modalities, length)."""

    def __init__(self, conversation: Conversation, replies: Replies, audio: InputAudio, limits: LimitSettings,
                 history: History) -> None:
        self.conversation = conversation
        self.replies = replies
        self.audio = audio
        self.limits = limits
        self.history = history
        self.defaults = ev.ReplyRequest()
        self._waiting: list[Entry] = []  # the items added since the last response.create; it hears their audio

    @property
    def waiting(self) -> list[Entry]:
        """The items added since the last response that are still in the history (the oldest may have gone)."""
        self._waiting = [e for e in self._waiting if self.history.holds(e)]
        return self._waiting

    def _admit(self, entry: Entry) -> None:
        """Refused where `entry` would take the items waiting for a response past their bounds: how many,
        their text together, and their audio together, which the response hears as one turn of the core."""
        waiting = self.waiting
        if len(waiting) >= self.limits.max_pending_items:
            raise Refused("too_many_items")
        if sum(e.chars for e in waiting) + entry.chars > self.limits.max_pending_chars:
            raise Refused("too_long", "item.content")
        audio = [e.audio for e in (*waiting, entry) if e.audio is not None]
        if sum(map(len, audio)) > self.audio.max_turn_s * ASR_RATE:
            raise Refused("too_long", "item.content")

    # ------------------------------------------------------------ conversation.item.*

    def create(self, wanted: rt.ItemIn, previous_item_id: str | None = None) -> list[rt.ServerEvent]:
        entry = self.entry(wanted, new_id("item"))
        self._admit(entry)
        previous = self.history.add(entry, previous_item_id)
        self._waiting.append(entry)
        if entry.audio is not None:
            return [rt.ItemAdded(item=entry.info(), previous_item_id=previous)]  # done once it is heard
        return [rt.ItemAdded(item=entry.info(), previous_item_id=previous),
                rt.ItemDone(item=entry.info(), previous_item_id=previous)]

    def commit(self) -> list[rt.ServerEvent]:
        """The input audio buffer, committed by the client: a user item to hear at the next response. Where
        the items already waiting leave no room for it, it is refused and the buffer kept as it was."""
        entry = self.audio.commit()
        try:
            self._admit(entry)
        except Refused:
            self.audio.keep(entry.audio)  # the client may send response.create first, or clear it
            raise
        previous = self.history.add(entry)
        self._waiting.append(entry)
        return [rt.Committed(item_id=entry.id, previous_item_id=previous),
                rt.ItemAdded(item=entry.info(), previous_item_id=previous)]

    def entry(self, wanted: rt.ItemIn, default_id: str) -> Entry:
        """The item a client sent, checked; Refused where it is not one we can hold."""
        item_id = wanted.id or default_id
        if len(item_id) > 64:
            raise Refused("invalid_value", "item.id")
        if wanted.type == "function_call":
            if not wanted.call_id or not wanted.name:
                raise Refused("invalid_event", "item.call_id" if not wanted.call_id else "item.name")
            return Entry(item_id, "function_call", call_id=wanted.call_id, name=wanted.name,
                         arguments=self._short(wanted.arguments or "{}"))
        if wanted.type == "function_call_output":
            if not wanted.call_id or wanted.output is None:
                raise Refused("invalid_event", "item.call_id" if not wanted.call_id else "item.output")
            return Entry(item_id, "function_call_output", call_id=wanted.call_id, output=self._short(wanted.output))
        if wanted.type != "message" or wanted.role not in ("user", "assistant", "system") or not wanted.content:
            raise Refused("unsupported", "item")
        return self._message(item_id, wanted.role, wanted.content)

    def _message(self, item_id: str, role: str, content: list[rt.ContentIn]) -> Entry:
        audio = [part for part in content if part.type == "input_audio"]
        if audio and (role != "user" or len(content) != 1):
            raise Refused("unsupported", "item.content")  # one audio part, from the user
        if audio and audio[0].audio:
            pcm = self.audio.whole(audio[0].audio)
            if len(pcm) > self.audio.max_turn_s * ASR_RATE:
                raise Refused("too_long", "item.content")
            return Entry(item_id, role=role, spoken=True, audio=pcm, seconds=len(pcm) / ASR_RATE,
                         status="in_progress")
        texts = [part.text if part.text is not None else part.transcript for part in content]
        if any(t is None for t in texts) or not "".join(t or "" for t in texts).strip():
            raise Refused("invalid_event", "item.content")
        spoken = any(part.type in ("input_audio", "output_audio") for part in content)
        return Entry(item_id, role=role, text=self._short("\n".join(t or "" for t in texts).strip()), spoken=spoken)

    def _short(self, text: str) -> str:
        if len(text) > self.limits.max_text_chars:
            raise Refused("too_long", "item.content")
        return text

    def retrieve(self, item_id: str) -> list[rt.ServerEvent]:
        return [rt.ItemRetrieved(item=self.history.get(item_id).info())]

    def delete(self, item_id: str) -> list[rt.ServerEvent]:
        entry = self.history.get(item_id)
        self.history.delete(item_id)
        self._waiting = [e for e in self._waiting if e is not entry]
        return [rt.ItemDeleted(item_id=item_id)]

    # ------------------------------------------------------------ response.*

    def respond(self, params: rt.ResponseParams | None) -> None:
        """Answer the audio added since the last response (if any), or the conversation as it stands (a
        greeting, the answer after a function's output), as one turn of the core: that audio joined is at most
        turns.max_turn_s, as each item added was checked (_admit)."""
        params = params or rt.ResponseParams()
        if self.replies.answering():
            raise Refused("conversation_already_has_active_response")
        request = self._request(params)
        out_of_band = params.conversation == "none"
        heard = [] if out_of_band else [e for e in self.waiting if e.audio is not None]
        if not out_of_band:
            self._waiting = []  # a new wait begins; an out-of-band response leaves the conversation's alone
        if self.conversation.memory.still_playing():
            # The protocol's rule: a reply the client did not truncate was heard whole. Without this
            # the core would cut it by its playback clock, as for the page's typing over its voice.
            self.conversation.interrupt(self.replies.last_reply_samples)
        conversation_id = None if out_of_band else self.replies.conversation_id
        self.replies.request(Response(new_id("resp"), heard, bool(heard), conversation_id, voice=request.voice,
                                      metadata=params.metadata))
        audio = np.concatenate([e.audio for e in heard if e.audio is not None]) if heard else None
        for entry in heard:
            entry.audio = None  # the turn has it now
        if audio is not None:
            self.audio.stop_listening()  # its turn is exactly this audio
        self.conversation.respond(request, audio=audio)

    def _request(self, params: rt.ResponseParams) -> ev.ReplyRequest:
        """The core's request for a response: the session's defaults, with what this response changes."""
        request = self.defaults
        if params.instructions is not None:
            request = msgspec.structs.replace(request, instructions=self._short(params.instructions) or None)
        if params.output_modalities is not None:
            request = msgspec.structs.replace(request, voice=speaks(params.output_modalities, "response"))
        if params.max_output_tokens is not None:
            request = msgspec.structs.replace(request, max_tokens=token_cap(params.max_output_tokens, "response"))
        if params.tools is not None or params.tool_choice is not None:
            base = request.tools or ToolSet()
            tools = base.tools if params.tools is None else tool_list(params.tools, "response")
            choice = base.choice if params.tool_choice is None else params.tool_choice
            request = msgspec.structs.replace(request, tools=tool_set(tools, choice, "response"))
        if params.conversation not in (None, "auto", "none"):
            raise Refused("unsupported", "response.conversation")
        if params.conversation == "none":
            request = msgspec.structs.replace(request, context=self._context(params.input))
        elif params.input is not None:
            raise Refused("unsupported", "response.input")  # only out of band: with conversation "none"
        return request

    def _context(self, given: list[rt.ItemIn] | None) -> list[dict]:
        """An out-of-band response's context: the items given (new ones, or references to the
        conversation's), or else the conversation as it stands."""
        if given is None:
            return self.history.messages()
        if len(given) > self.limits.max_pending_items:
            raise Refused("too_many_items", "response.input")  # as many as may wait for an in-band response
        entries = [self.history.get(item.id or "") if item.type == "item_reference" else self.entry(item, "")
                   for item in given]
        if any(e.audio is not None for e in entries):
            raise Refused("unsupported", "response.input")  # audio to hear, out of band: not in the core
        if sum(e.chars for e in entries) > self.limits.max_pending_chars:
            raise Refused("too_long", "response.input")
        return self.history.messages(entries)

    def cancel(self) -> None:
        """The newest response is cancelled by the client: stopped now if its turn runs, else as soon as it
        does (the core cuts off only the turn it is answering)."""
        if not (answering := self.replies.answering()):
            raise Refused("response_cancel_not_active")
        answering[-1].cancel_reason = "client_cancelled"
        if answering[-1].running:
            self.conversation.interrupt(None, cause="client")

    def truncate(self, event: rt.ItemTruncate, sample_rate: int) -> list[rt.ServerEvent]:
        """The client played `audio_end_ms` of the latest reply: the history keeps what was heard.
        `sample_rate` is the voice's own: the core counts the reply in its samples."""
        if event.item_id != self.replies.last_reply_item or event.audio_end_ms < 0:
            raise Refused("item_not_found", "item_id")
        # It may stop what the conversation is doing while that reply is still being made (the client's cut),
        # or when nothing else is; never another response that started since.
        answering = self.replies.answering()
        cut = [r for r in answering if r.message is not None and r.message.id == event.item_id]
        for response in cut:
            response.cancel_reason = "client_cancelled"
        if cut or not answering:
            heard = self.conversation.interrupt(event.audio_end_ms * sample_rate // 1000)
            if heard is not None:  # a finished reply: its item keeps what was heard (a running one: at its end)
                self.history.get(event.item_id).text = heard
        return [rt.ItemTruncated(item_id=event.item_id, content_index=event.content_index,
                                 audio_end_ms=event.audio_end_ms)]


MAX_TOOLS = 64


def speaks(modalities: list[str], where: str) -> bool:
    """output_modalities: ["audio"] (with its transcript) or ["text"]."""
    if modalities in (["audio"], ["text", "audio"], ["audio", "text"]):
        return True
    if modalities == ["text"]:
        return False
    raise Refused("unsupported", f"{where}.output_modalities")


def token_cap(value: int | str, where: str) -> int | None:
    if value == "inf":
        return None
    if isinstance(value, int) and 1 <= value <= 4096:
        return value
    raise Refused("invalid_value", f"{where}.max_output_tokens")


def tool_list(tools: list[rt.FunctionTool], where: str) -> tuple[Tool, ...]:
    """The client's function tools, as the engine checks them (names, each its own)."""
    if len(tools) > MAX_TOOLS or any(t.type != "function" for t in tools):
        raise Refused("unsupported", f"{where}.tools")
    try:
        return ToolSet(tuple(Tool(t.name, t.description, t.parameters) for t in tools)).tools
    except ValueError as exc:
        raise Refused("invalid_value", f"{where}.tools") from exc


def tool_set(tools: tuple[Tool, ...], choice: rt.ToolChoice, where: str) -> ToolSet | None:
    name = choice.name if isinstance(choice, rt.NamedChoice) else choice
    if name == "required" and not tools:
        raise Refused("invalid_value", f"{where}.tool_choice")
    try:
        toolset = ToolSet(tools, name)
    except ValueError as exc:  # a choice that is none of the tools
        raise Refused("invalid_value", f"{where}.tool_choice") from exc
    return toolset if tools else None
