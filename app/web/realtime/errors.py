"""How /v1/realtime says no: a refused client event, and the core's errors, as the protocol's `error`."""

from __future__ import annotations

from app.core import events as ev
from app.web.realtime import protocol as rt

# What each refused client event is told; the details go to the log.
MESSAGES = {
    "invalid_event": "The event was not understood and was skipped.",
    "unknown_event": "This server does not know that event type; it was skipped.",
    "unsupported": "This server does not support that (see docs/protocol.md, OpenAI Realtime API).",
    "invalid_value": "A setting is out of range (silence_duration_ms: 100 to 5000; instructions: at most 4000 "
                     "characters; max_output_tokens: 1 to 4096 or \"inf\"; tool_choice: auto, none, required or "
                     "one of the tools; tools: distinct names).",
    "invalid_audio": "The audio is not base64 PCM16 at 24 kHz, or is too long for one event.",
    "input_audio_buffer_commit_empty": "There is no audio to commit.",
    "buffer_full": "The input audio buffer holds the longest turn already; commit or clear it first.",
    "item_exists": "An item with that id is already in the conversation.",
    "conversation_already_has_active_response": "A response is in progress; cancel it first.",
    "response_cancel_not_active": "There is no response in progress to cancel.",
    "item_not_found": "There is no such item (and only the latest assistant reply can be truncated).",
    "too_many_items": "Too many items are waiting for a response; send response.create (or delete some) before "
                      "adding more.",
    "too_long": "That is too long: an item (its text, or audio longer than one turn), the instructions, or the "
                "items waiting for a response together (their text, or their audio: one turn at most). Shorten "
                "it, or send response.create first.",
}


class Refused(Exception):
    """A client event that is answered with an `error` and otherwise skipped."""

    def __init__(self, code: str, param: str | None = None, *, kind: str = "invalid_request_error") -> None:
        super().__init__(code)
        self.code, self.param, self.kind = code, param, kind


def refusal(refused: Refused, event_id: str | None) -> rt.Error:
    message = MESSAGES.get(refused.code) or ev.ERROR_MESSAGES[refused.code]
    return rt.Error(error=rt.ErrorInfo(refused.kind, refused.code, message, refused.param, event_id))


def error_event(error: ev.Error) -> rt.Error:
    """One of the core's errors (app/core/events.py), in this protocol's shape."""
    client = ("too_long", "bad_message", "bad_audio", "audio_too_fast")
    kind = "invalid_request_error" if error.code in client else "server_error"
    return rt.Error(error=rt.ErrorInfo(kind, error.code, error.message))
