"""The conversation agent's memory: one core Conversation (app/core/conversation.py) per Home Assistant
conversation_id, answering typed turns in text only; one unused for conversation_idle_s is forgotten, and at most
max_conversations are kept (the least recently used goes first)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.config import Settings
from app.core import events as ev
from app.core.conversation import Conversation
from app.core.metrics import Metrics
from app.engines.loaded import Engines

log = logging.getLogger(__name__)
TEXT_ONLY = ev.ReplyRequest(voice=False)


class NotAnswered(Exception):
    """The turn ended without a reply; the message says why, in words."""


@dataclass
class Chat:
    conversation: Conversation
    used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one turn at a time: each reads its own events


class Chats:
    def __init__(self, settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._chats: dict[str, Chat] = {}

    def __len__(self) -> int:
        return len(self._chats)

    async def reply(self, engines: Engines, conversation_id: str, text: str) -> str:
        """The assistant's answer to `text` in conversation `conversation_id`, which remembers it."""
        await self._forget_idle()
        chat = self._chats.pop(conversation_id, None) or await self._new(engines)
        self._chats[conversation_id] = chat  # newest last: the order is the order of use
        async with chat.lock:
            chat.used = self._clock()
            try:
                return await _answer(chat.conversation, text)
            finally:
                chat.used = self._clock()

    async def _new(self, engines: Engines) -> Chat:
        wyoming = self._settings.wyoming
        while len(self._chats) >= wyoming.max_conversations:
            oldest = next(iter(self._chats))
            log.info("wyoming: forgetting conversation %s (max_conversations %d)", oldest, wyoming.max_conversations)
            await self._chats.pop(oldest).conversation.close()
        conversation = Conversation(engines, self._settings, self._metrics)
        conversation.defaults = TEXT_ONLY
        conversation.start()
        return Chat(conversation, self._clock())

    async def _forget_idle(self) -> None:
        limit = self._settings.wyoming.conversation_idle_s
        for key, chat in list(self._chats.items()):
            if not chat.lock.locked() and self._clock() - chat.used > limit:
                log.info("wyoming: conversation %s forgotten after %.0f s unused", key, limit)
                await self._chats.pop(key).conversation.close()

    async def close(self) -> None:
        while self._chats:
            await self._chats.popitem()[1].conversation.close()


async def _answer(conversation: Conversation, text: str) -> str:
    """Say `text`, then read the conversation's events up to the turn's end: its reply, or NotAnswered. The turn is
    known by its transcript, so the leftovers of a turn whose asker went away (its events still come) are skipped."""
    said = text.strip()
    conversation.respond(TEXT_ONLY, text=said)
    turn: int | None = None
    error: ev.Error | None = None
    while (event := await conversation.next_event()) is not None:
        if isinstance(event, ev.Transcript) and turn is None and event.text == said:
            turn = event.turn
        elif isinstance(event, ev.Error) and turn is not None and event.turn in (None, turn):
            error = event
        elif isinstance(event, ev.TurnEnd) and turn is not None and event.turn == turn:
            if event.reason == "completed" and event.reply:
                return event.reply
            raise NotAnswered(error.message if error is not None else "Sorry, I have no answer to that.")
    raise NotAnswered("Sorry, the conversation was closed.")
