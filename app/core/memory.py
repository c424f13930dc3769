"""What the assistant remembers of a conversation: the exchanges, each reply as far as it was heard.

A reply leaves the server faster than it is played; when the listener cuts it off, or stops it
after it was all sent, the history keeps only the words played by then (app/core/reply.py says which).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from app.core.metrics import Metrics
from app.core.reply import Reply
from app.engines.llm import Message


class Memory:
    def __init__(self, metrics: Metrics) -> None:
        self.history: list[Message] = []  # trimmed in place to fit the context (ChatModel.build_messages)
        self._metrics = metrics
        self._last_reply: Reply | None = None  # the latest reply that had audio, while it may still play
        self._last_audio: np.ndarray | None = None  # the speech its user turn was, to take back (take_back)
        self.recording = True  # False: an adapter keeps the history (follow()); this only times replies
        self._source: Callable[[], list[Message]] | None = None
        self._settled: Callable[[], Awaitable[None]] | None = None

    def follow(self, history: Callable[[], list[Message]], settled: Callable[[], Awaitable[None]]) -> None:
        """An adapter keeps the history itself (the Realtime protocol's items, which its client edits): replies
        read it from `history()`, and no exchange is recorded here. The adapter learns what was said from the
        conversation's events, so a reply first awaits `settled()`: every event before it has been read."""
        self._source, self._settled, self.recording = history, settled, False

    async def settled(self) -> None:
        """The history holds everything said so far (at once, unless an adapter still reads the events)."""
        if self._settled is not None:
            await self._settled()

    def messages(self) -> list[Message]:
        """The messages before the next user words: this memory's own (trimmed in place), or the adapter's."""
        return self.history if self._source is None else self._source()

    def turn_ended(self, user_text: str | None, said: str, reply: Reply, *, interrupted: bool,
                   audio: np.ndarray | None = None) -> None:
        """Remember the exchange (none without user_text) and which reply may still be playing, with
        the user's speech (`audio`) that it answered."""
        if user_text and said and self.recording:
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": said}]
            reply.history_index = len(self.history) - 1
        if reply.samples:
            # An interrupted reply stopped playing with it: nothing of it can be cut off later.
            self._last_reply = None if interrupted else reply
            self._last_audio = None if interrupted else audio

    def still_playing(self) -> bool:
        return self._last_reply is not None and self._last_reply.still_playing()

    def cut_last(self, played: int | None) -> str | None:
        """The finished reply was stopped after `played` samples (None: by the playback clock, and
        only if it is still playing): keep only what was heard of it. Returns those words (None: no
        reply to cut)."""
        reply = self._last_reply
        if reply is None or (played is None and not reply.still_playing()):
            return None
        heard = reply.heard(reply.played_estimate() if played is None else played)
        index = reply.history_index
        # Unless a newer exchange followed: then this one is no longer the last word.
        if index is not None and index == len(self.history) - 1:
            if heard:
                self.history[index]["content"] = heard
            else:
                del self.history[index - 1 :]  # nothing heard: the exchange never happened
            self._metrics.barge_ins.inc()
        reply.history_index = None
        return heard

    def take_back(self, t_onset: float, within_s: float) -> np.ndarray | None:
        """The user went on talking (from `t_onset`) before the last reply had played out, within
        `within_s` of its start: their turn had been ended too early. Forget that exchange, cut reply and
        all, and return the speech of the user's turn, to be answered again with what follows (None: no
        such reply)."""
        reply, audio = self._last_reply, self._last_audio
        if not self.recording:  # the adapter's client owns the history: the server does not rewrite it
            return None
        if reply is None or audio is None or t_onset >= reply.playback_end():
            return None
        if not reply.continued_by(t_onset, within_s):
            return None
        index = reply.history_index
        if index is not None and index == len(self.history) - 1:
            del self.history[index - 1 :]
        reply.history_index = None
        self._last_reply, self._last_audio = None, None
        self._metrics.barge_ins.inc()
        return audio

    def forget(self) -> None:
        self.history.clear()
        self._last_reply, self._last_audio = None, None
