"""What one client may ask of the server, so that no session can starve the others or make the
server buffer without bound. Every limit is a setting (`VA_LIMITS__<FIELD>`); hitting one is an
`error` event with its code (app/core/events.py), never a lost session for anyone else."""

from __future__ import annotations

import msgspec


class LimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Open /ws sessions; the next one gets `busy` and is closed with 1013 (try again later).
    max_sessions: int = 8
    # Turns waiting behind the one being answered; one more drops the oldest waiting (`turn_dropped`).
    max_queued_turns: int = 2
    # Characters of a typed message; a longer one is refused (`too_long`).
    max_text_chars: int = 2000
    # Context tokens a system prompt must leave free beside the longest reply, for the user's
    # message and some history; a `hello` whose prompt does not fit is refused (`too_long`).
    prompt_room_tokens: int = 256
    # A WebSocket frame larger than this is refused by uvicorn before it is read whole (close 1009):
    # a little above the largest audio frame (512 KB, app/web/ws.py) and any JSON message.
    max_frame_bytes: int = 576 * 1024
    # Bytes of events waiting to go out to one client; past it the reply's audio is dropped and its
    # turn ends `interrupted` (`slow_client`): about 45 s of 22 kHz voice.
    max_outgoing_bytes: int = 2 * 1024 * 1024
    # /v1/realtime: items added while no response.create has come (user text or audio, committed buffers,
    # any other item); one more is refused (`too_many_items`). Their audio is heard as one turn of the core,
    # so together it is at most turns.max_turn_s (`too_long`), like one committed buffer.
    max_pending_items: int = 64
    # /v1/realtime: characters of text (messages, function calls' arguments and outputs) of those waiting items
    # together; an item that would go past it is refused (`too_long`): eight typed messages' worth, more
    # than the cpu preset's whole context (2048 tokens) holds, so no response is kept from reading what fits.
    max_pending_chars: int = 16000
    # /v1/realtime: items a conversation keeps; past it the oldest goes (the model reads only the newest
    # exchanges anyway: llm.history_turns), so no client can grow the history without bound.
    max_items: int = 512

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_queued_turns < 1 or self.max_text_chars < 1:
            raise ValueError("limits: max_sessions, max_queued_turns and max_text_chars must be >= 1")
        if self.prompt_room_tokens < 0 or self.max_frame_bytes < 1024 or self.max_outgoing_bytes < 64 * 1024:
            raise ValueError("limits: prompt_room_tokens >= 0, max_frame_bytes >= 1024, "
                             "max_outgoing_bytes >= 65536")
        if not 1 <= self.max_pending_items <= self.max_items or self.max_pending_chars < self.max_text_chars:
            raise ValueError("limits: 1 <= max_pending_items <= max_items, max_pending_chars >= max_text_chars")

