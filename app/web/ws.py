"""The page's `/ws` protocol, as a thin adapter over the conversation core.

Text frames are JSON control messages (app/web/ws_protocol.py) that become calls on the Conversation;
binary frames are the browser's recording (WebM, Ogg, MP4 or WAV, as audio_start declares), decoded here to
16 kHz PCM for the conversation's Listener. The conversation's events go back out in order: JSON
events as text frames, reply audio as raw s16le binary frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from litestar.exceptions import WebSocketException

from app.audio import StreamDecoder
from app.config import Settings
from app.core import events as ev
from app.core.conversation import Conversation
from app.core.metrics import Metrics
from app.engines.llm import system_prompt_budget
from app.engines.loaded import Engines
from app.web import ws_protocol as p
from app.web.incoming import Incoming

log = logging.getLogger(__name__)

_Frame = TypeVar("_Frame", str, bytes)
MAX_AUDIO_FRAME = 512 * 1024  # bytes; MediaRecorder sends ~2 KB every 100 ms


class WsSession:
    """One /ws connection: socket and dispatch only; the conversation does the rest."""

    def __init__(self, engines: Engines, settings: Settings, metrics: Metrics | None = None) -> None:
        self.engines = engines
        self.settings = settings
        self.conversation = Conversation(engines, settings, metrics)
        self.id = self.conversation.id
        self.limits = settings.limits
        self._decoder: StreamDecoder | None = None  # the recording being received
        self._refused = False  # the recording is in a container we do not read: its bytes are dropped
        # The writer's sends and a pong's share the socket one at a time, so that no frame interleaves another.
        self._sending = asyncio.Lock()
        self._send_text: Callable[[str], Awaitable[None]] | None = None
        self._pong: asyncio.Task[None] | None = None

    async def serve(
        self,
        receive: Callable[[], Awaitable[dict]],
        send_text: Callable[[str], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Run until the client goes away or its session ends (app/web/incoming.py: idle, or not reading); whatever
        happens, stop all work for this connection. Past max_sessions, say `busy` and close (1013, try again later)."""
        if self.conversation.metrics.sessions_open() >= self.limits.max_sessions:
            await self._refuse(send_text)
        self.conversation.start()  # counted open from here: no await before it lets another in
        writer: asyncio.Task[None] | None = None
        send_text, send_bytes = self._locked(send_text), self._locked(send_bytes)
        self._send_text = send_text
        incoming = Incoming(receive, self.conversation, self.limits, f"session {self.id}")
        try:
            ready = p.Ready(self.id, self.engines.tts.sample_rate, self.settings.preset, **self.settings.models())
            await send_text(p.encode_event(ready))
            writer = asyncio.create_task(self._write(send_text, send_bytes))
            while (message := await incoming.next()) is not None:
                if message.get("bytes") is not None:
                    self.on_audio(message["bytes"])
                elif message.get("text") is not None:
                    self.on_control(message["text"])
        finally:
            incoming.close()
            if self._pong is not None:
                self._pong.cancel()
            self._stop_recording()
            await self.conversation.close()
            if writer is not None:
                await writer
            log.info("session %s closed", self.id)

    def _locked(self, send: Callable[[_Frame], Awaitable[None]]) -> Callable[[_Frame], Awaitable[None]]:
        async def send_alone(data: _Frame) -> None:
            async with self._sending:
                await send(data)

        return send_alone

    def _answer_ping(self) -> None:
        """A `pong` now, beside the writer (not behind the replies it has queued). One at a time: a client that
        pings but does not read gets no pile of them."""
        if self._send_text is None or (self._pong is not None and not self._pong.done()):
            return
        self._pong = asyncio.create_task(self._send_pong(self._send_text))

    async def _send_pong(self, send_text: Callable[[str], Awaitable[None]]) -> None:
        try:
            await send_text(p.encode_event(p.Pong()))
        except Exception:  # the client vanished; the receive loop notices and cleans up
            log.info("session %s: pong not sent, client gone", self.id)

    async def _refuse(self, send_text: Callable[[str], Awaitable[None]]) -> None:
        log.warning("session %s refused: %d sessions open (limits.max_sessions)", self.id,
                    self.conversation.metrics.sessions_open())
        await send_text(p.encode_event(ev.error("busy")))
        raise WebSocketException(detail="busy", code=1013)

    async def _write(
        self, send_text: Callable[[str], Awaitable[None]], send_bytes: Callable[[bytes], Awaitable[None]]
    ) -> None:
        while (event := await self.conversation.next_event()) is not None:
            try:
                if isinstance(event, ev.ReplyAudio):
                    await send_bytes(event.pcm.astype("<i2").tobytes())
                else:
                    await send_text(p.encode_event(event))
            except Exception:  # the client vanished; the receive loop notices and cleans up
                log.info("session %s: send failed, client gone", self.id)
                return

    def on_control(self, data: str) -> None:
        try:
            message = p.decode_client(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.info("session %s: skipped a malformed message: %s", self.id, exc)
            self.conversation.emit(ev.error("bad_message"))
            return
        if isinstance(message, p.Ping):  # a heartbeat is not use: it leaves the idle clock alone
            self._answer_ping()
            return
        self.conversation.idle.used()  # a message but audio is the user at work (a silent microphone is not)
        match message:
            case p.Hello():
                if self._prompt_fits(message.system_prompt):
                    self.conversation.configure(message)
            case p.AudioStart():
                self._start_recording(message)
            case p.AudioStop():
                self._stop_recording()
            case p.UserText():
                if self._text_fits(message.text):
                    self.conversation.say(message.text)
            case p.Interrupt():
                self.conversation.interrupt(message.played_samples)
            case p.Reset():
                self.conversation.reset()

    def _prompt_fits(self, prompt: str | None) -> bool:
        """A system prompt that leaves no room in the context is refused here, once, rather than
        failing every turn; the options stay as they were."""
        if prompt is None:
            return True
        budget = system_prompt_budget(self.engines.llm.settings, self.limits.prompt_room_tokens)
        if (tokens := self.engines.llm.count_tokens(prompt)) <= budget:
            return True
        log.info("session %s: refused a system prompt of %d tokens (at most %d)", self.id, tokens, budget)
        self.conversation.emit(ev.error("too_long"))
        return False

    def _text_fits(self, text: str) -> bool:
        if len(text) <= self.limits.max_text_chars:
            return True
        log.info("session %s: refused a text of %d characters (at most %d)", self.id, len(text),
                 self.limits.max_text_chars)
        self.conversation.emit(ev.error("too_long"))
        return False

    def on_audio(self, data: bytes) -> None:
        if len(data) > MAX_AUDIO_FRAME:
            log.info("session %s: skipped an audio frame of %d bytes (at most %d)", self.id, len(data),
                     MAX_AUDIO_FRAME)
            self.conversation.emit(ev.error("bad_audio"))
            return
        if self._refused:
            return  # never decoded, nor probed
        if self._decoder is None:  # audio without audio_start: in the page's usual container
            self._start_recording(p.AudioStart())
        assert self._decoder is not None
        if not self._decoder.feed(data) and self.conversation.allowance.tell_now():
            log.info("session %s: dropped audio: %d bytes wait for the decoder already (max_pending_audio_bytes)",
                     self.id, self.limits.max_pending_audio_bytes)
            self.conversation.emit(ev.error("audio_too_fast"))

    def _start_recording(self, start: p.AudioStart) -> None:
        self._stop_recording()
        if (container := start.container) is None:
            log.info("session %s: refused a recording in %r (not WebM, Ogg, MP4 or WAV)", self.id,
                     start.mime_type[:100])
            self.conversation.emit(ev.error("bad_audio"))
            self._refused = True  # until the next audio_start or audio_stop
            return
        listener = self.conversation.listen()  # which drops the PCM that comes faster than the session's allowance
        self._decoder = StreamDecoder(listener.feed, listener.end, container,
                                      max_pending=self.limits.max_pending_audio_bytes)

    def _stop_recording(self) -> None:
        self._refused = False
        if self._decoder is not None:
            self._decoder.close()  # the listener's end() follows from the decoder's thread
            self._decoder = None
            self.conversation.stop_listening()
