"""What /v1/realtime says of the user's spoken turns besides answering them: interim transcripts as appended
deltas while the user speaks, and the turns the server's VAD commits without a response (create_response off).

The core's interim transcripts are whole re-transcriptions of the turn so far; the protocol's deltas only
append. Each delta is the words past those already sent, less the last word (it is still being spoken, often
cut mid-word). When a new interim rewrites words already sent, they stay as sent (the protocol cannot take text
back) and only the words past their count follow; the .completed event's transcript is the turn's true text,
which a client shows in place of the deltas.
"""

from __future__ import annotations

from typing import Protocol

from app.core import events as ev
from app.web.realtime import protocol as rt
from app.web.realtime.errors import error_event


class SpokenItem(Protocol):
    """A user item of audio (app/web/realtime/history.py's Entry); `text` is its transcript, once known."""

    id: str
    seconds: float
    text: str | None
    status: str

    def info(self) -> rt.AnyItem: ...


def transcribed(item: SpokenItem, text: str, *, transcribe: bool) -> list[rt.ServerEvent]:
    """The item's transcript is in: .completed (when the session transcribes), and the item is done."""
    item.text, item.status = text, "completed"
    out: list[rt.ServerEvent] = []
    if transcribe:
        out.append(rt.TranscriptionCompleted(item_id=item.id, transcript=text, usage=rt.Usage(round(item.seconds, 3))))
    return out + [rt.ItemDone(item=item.info())]


class InterimDeltas:
    """The words the turn being spoken (one at a time) has sent as deltas."""

    def __init__(self) -> None:
        self._turn, self._sent = 0, 0

    def delta(self, interim: ev.Transcript, item: SpokenItem | None) -> list[rt.ServerEvent]:
        """The words `interim` adds to the `item` of its turn (None: no item to add to)."""
        if interim.turn != self._turn:
            self._turn, self._sent = interim.turn, 0
        words = interim.text.split()[:-1]
        if item is None or len(words) <= self._sent:
            return []
        delta, self._sent = (" " if self._sent else "") + " ".join(words[self._sent :]), len(words)
        return [rt.TranscriptionDelta(item_id=item.id, delta=delta)]


class NotAnswered:
    """VAD turns committed without a response: each is transcribed into its item, which stays in the
    conversation for the client's next response.create to answer with the rest of the history."""

    def __init__(self) -> None:
        self._turns: dict[int, SpokenItem] = {}  # committed, until their TurnEnd

    def committed(self, turn: int, item: SpokenItem) -> None:
        self._turns[turn] = item

    def __contains__(self, turn: object) -> bool:
        return turn in self._turns

    def translate(self, event: ev.Event, *, transcribe: bool) -> list[rt.ServerEvent]:
        """An event of one of these turns: its Transcript, its Error, its TurnEnd: "not_answered"; "no_speech",
        nothing was heard; "interrupted", the user went on at once (the core's continued turn), its words are
        heard again in the next turn's item. Either of the last two leaves the item with an empty transcript."""
        item = self._turns[event.turn]  # type: ignore[union-attr]
        match event:
            case ev.Transcript(final=True):
                return transcribed(item, event.text, transcribe=transcribe)
            case ev.TurnEnd():
                del self._turns[event.turn]
                return transcribed(item, "", transcribe=transcribe) if item.text is None else []
            case ev.Error():
                return [error_event(event)]
        return []
