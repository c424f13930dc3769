"""The Realtime conversation's items, in order: what the client and the assistant said, function calls and
their outputs. The client may add, insert, read and delete them; the language model reads them as its history.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from app.engines.llm import Message
from app.web.realtime import protocol as rt
from app.web.realtime.errors import Refused


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class Entry:
    """One item. A message has a role and text (typed, written, or the transcript of its audio); a
    function call its call_id, name and arguments; a call's output its call_id and output."""

    id: str
    kind: str = "message"  # message | function_call | function_call_output
    role: str = "user"  # user | assistant | system
    text: str | None = None  # input_text / output_text, or the transcript of input_audio / output_audio
    spoken: bool = False  # its content is audio (text is then its transcript, None until known)
    audio: np.ndarray | None = None  # a user's audio at 16 kHz, until the turn that answers it takes it
    seconds: float = 0.0  # how long that audio was
    call_id: str = ""
    name: str = ""
    arguments: str = ""
    output: str = ""
    status: str = "completed"

    @property
    def chars(self) -> int:
        """Characters of text the model reads of it: its text or transcript, a call's name, arguments, output."""
        return len(self.text or "") + len(self.name) + len(self.arguments) + len(self.output)

    def info(self) -> rt.AnyItem:
        if self.kind == "function_call":
            return rt.CallItem(self.id, self.call_id, self.name, self.arguments, self.status)
        if self.kind == "function_call_output":
            return rt.CallOutputItem(self.id, self.call_id, self.output, self.status)
        return rt.Item(self.id, self.role, [self._content()], self.status)  # type: ignore[arg-type]

    def _content(self) -> rt.Content:
        if self.role == "assistant":
            if self.spoken:
                return rt.Content("output_audio", transcript=self.text or "")
            return rt.Content("output_text", text=self.text or "")
        if self.spoken:
            return rt.Content("input_audio", transcript=self.text)
        return rt.Content("input_text", text=self.text or "")

    def message(self) -> Message | None:
        """This item as the language model reads it (None: nothing to read yet, e.g. audio not heard)."""
        if self.kind == "function_call":
            call = {"id": self.call_id, "type": "function", "function": {"name": self.name,
                                                                        "arguments": self.arguments or "{}"}}
            return {"role": "assistant", "content": "", "tool_calls": [call]}
        if self.kind == "function_call_output":
            return {"role": "tool", "tool_call_id": self.call_id, "content": self.output}
        if not self.text:
            return None
        return {"role": self.role, "content": self.text}


class History:
    """The items in conversation order, found by id; at most `max_items` (limits.max_items), the oldest going
    first (the model reads only the newest few exchanges anyway: llm.history_turns)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.entries: list[Entry] = []

    @property
    def last_id(self) -> str | None:
        return self.entries[-1].id if self.entries else None

    def get(self, item_id: str) -> Entry:
        for entry in self.entries:
            if entry.id == item_id:
                return entry
        raise Refused("item_not_found", "item_id")

    def add(self, entry: Entry, previous_item_id: str | None = None) -> str | None:
        """Put `entry` after `previous_item_id` (None: at the end; "root": first); returns the id of the
        item before it. An id already in use, or an unknown previous id, is refused."""
        if any(e.id == entry.id for e in self.entries):
            raise Refused("item_exists", "item.id")
        if previous_item_id is None:
            at = len(self.entries)
        elif previous_item_id == "root":
            at = 0
        else:
            at = self.entries.index(self.get(previous_item_id)) + 1
        self.entries.insert(at, entry)
        previous = self.entries[at - 1].id if at > 0 else None
        if len(self.entries) > self.max_items:
            del self.entries[1 if at == 0 else 0]  # the oldest, unless that is the item just put first
        return previous

    def holds(self, entry: Entry) -> bool:
        return any(e is entry for e in self.entries)

    def delete(self, item_id: str) -> None:
        self.entries.remove(self.get(item_id))

    def messages(self, entries: list[Entry] | None = None) -> list[Message]:
        """`entries` (by default all of them) as the language model's history."""
        return [m for e in (self.entries if entries is None else entries) if (m := e.message()) is not None]
