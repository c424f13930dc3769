"""A conversation's outgoing events, in order, with the bytes they hold counted, so that a client
that stops reading cannot make the server buffer without bound (LimitSettings.max_outgoing_bytes);
the audio of a reply that was cut off never goes out, even if it was queued before the cut."""

from __future__ import annotations

import asyncio

from app.core import events as ev

EVENT_BYTES = 96  # a JSON event's fields besides its text: a fair guess, it is never encoded here


def size_of(event: ev.Event | None) -> int:
    if isinstance(event, ev.ReplyAudio):
        return event.pcm.nbytes
    if event is None:
        return 0
    text = getattr(event, "text", None) or getattr(event, "delta", None) or getattr(event, "reply", "")
    return EVENT_BYTES + len(text)


class Outbox:
    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.bytes = 0  # what the events waiting here hold
        self.silenced: set[int] = set()  # turns whose queued audio must not go out any more
        self.taken = 0  # events get() has returned
        self._queue: asyncio.Queue[ev.Event | None] = asyncio.Queue()

    def put(self, event: ev.Event | None) -> bool:
        """Queue `event`; reply audio that would take the outbox past its cap is refused (False),
        unless the outbox is empty: one chunk always goes (its size is the TTS engine's)."""
        size = size_of(event)
        if isinstance(event, ev.ReplyAudio) and self.bytes and self.bytes + size > self.cap_bytes:
            return False
        self.bytes += size
        self._queue.put_nowait(event)
        return True

    @property
    def waiting(self) -> bool:
        return not self._queue.empty()

    async def get(self) -> ev.Event | None:
        """The next event that may go out; None once the conversation is closed."""
        while True:
            event = await self._queue.get()
            self.bytes -= size_of(event)
            if not (isinstance(event, ev.ReplyAudio) and event.turn in self.silenced):
                self.taken += 1
                return event

    def stop_turn(self, turn_id: int) -> bool:
        """The client is not reading `turn_id`'s audio: none of the rest of it goes out. True the first
        time, when the turn is still to be stopped."""
        if turn_id in self.silenced:
            return False
        self.silenced.add(turn_id)
        return True
