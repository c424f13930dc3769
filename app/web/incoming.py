"""What comes in from one client, for both WebSocket adapters (ws.py, realtime/session.py), and the two ways
a session ends by itself: a client that keeps sending but never reads (close 1008, "slow_client"), and a
session nobody uses (limits.idle_timeout_s: an `error` `idle`, then close 1000, "idle")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from litestar.exceptions import WebSocketException

from app.core import events as ev
from app.core.conversation import Conversation
from app.core.limits import LimitSettings

log = logging.getLogger(__name__)

IDLE_CLOSE = 1000  # a normal closure: nothing went wrong, and the page does not reconnect by itself
SLACK_S = 0.05  # wake a little after the idle clock runs out, not a little before


class Idle(WebSocketException):
    """The session went unused for limits.idle_timeout_s; its `error` has been emitted, and this closes it."""

    def __init__(self) -> None:
        super().__init__(detail="idle", code=IDLE_CLOSE)


class Incoming:
    """One client's messages, in order. Between two, the session may end: the conversation's events pile up
    unread past twice limits.max_outgoing_bytes (reply audio past the cap is dropped, but every message a
    client sends may be answered), or it has gone unused for limits.idle_timeout_s (its IdleClock; 0: never),
    checked at every message and by a timer set for the moment it would run out, which stops the receive
    under way. `name` is the session's, for the log; close() when the session ends."""

    def __init__(self, receive: Callable[[], Awaitable[dict]], conversation: Conversation, limits: LimitSettings,
                 name: str) -> None:
        self._receive = receive
        self._conversation = conversation
        self._limits = limits
        self._name = name
        self._receiving: asyncio.Task | None = None  # the task waiting in receive(), for the timer to stop
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        if limits.idle_timeout_s:
            self._timer = asyncio.get_running_loop().call_later(limits.idle_timeout_s + SLACK_S, self._tick)

    async def next(self) -> dict | None:
        """The next message; None once the client has gone. Raises WebSocketException where the session ends."""
        self._check_backlog()
        if self._unused():
            self._close_idle()
        self._receiving = asyncio.current_task()
        try:
            message = await self._receive()  # awaited directly: a task per message would slow a busy session
        except asyncio.CancelledError:
            if not self._expired:  # the server is shutting down
                raise
            self._receiving.uncancel()  # type: ignore[union-attr]
            self._close_idle()
        finally:
            self._receiving = None
        return None if message["type"] == "websocket.disconnect" else message

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _unused(self) -> bool:
        return bool(self._limits.idle_timeout_s) and self._conversation.idle.idle_s >= self._limits.idle_timeout_s

    def _tick(self) -> None:
        """The idle clock may have run out: stop the receive under way (next() says why), or look again when
        it would run out now (a message being handled: next() looks first)."""
        if self._unused() and self._receiving is not None:
            self._expired = True
            self._receiving.cancel()
            return
        left = max(0.0, self._limits.idle_timeout_s - self._conversation.idle.idle_s)
        self._timer = asyncio.get_running_loop().call_later(left + SLACK_S, self._tick)

    def _check_backlog(self) -> None:
        waiting = self._conversation.outbox.bytes
        if waiting > 2 * self._limits.max_outgoing_bytes:
            log.warning("%s closed: the client sends but does not read (%d bytes wait to go out)", self._name,
                        waiting)
            raise WebSocketException(detail="slow_client", code=1008)

    def _close_idle(self) -> None:
        """Say why, in the conversation's events (the adapter's writer sends them all before the socket closes)."""
        self.close()
        log.info("%s closed: unused for %.0f s (limits.idle_timeout_s)", self._name, self._limits.idle_timeout_s)
        self._conversation.emit(ev.idle_error(self._limits.idle_timeout_s))
        raise Idle()
