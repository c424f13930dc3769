"""The OpenAI Realtime protocol on `/v1/realtime`: a second thin adapter over the conversation core.

Client events (app/web/realtime/protocol.py) become calls on the Conversation, like app/web/ws.py's page
messages; the conversation's events become the protocol's server events (app/web/realtime/replies.py),
its voice resampled to 24 kHz PCM16 in base64.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import msgspec
import numpy as np
from litestar.exceptions import WebSocketException

from app.core import events as ev
from app.web.realtime import protocol as rt
from app.audio import ASR_RATE
from app.core.conversation import Conversation
from app.engines.loaded import Engines
from app.core.listening import Listener
from app.engines.llm import system_prompt_budget
from app.core.metrics import Metrics
from app.web.realtime.replies import Replies, Resampler, UserItem, error_event, new_id
from app.web.ws import MAX_AUDIO_FRAME

log = logging.getLogger(__name__)

# What each refused client event is told; the details go to the log.
MESSAGES = {
    "invalid_event": "The event was not understood and was skipped.",
    "unknown_event": "This server does not know that event type; it was skipped.",
    "unsupported": "This server does not support that (see the README's OpenAI Realtime section).",
    "invalid_value": "A setting is out of range (silence_duration_ms: 100 to 5000; instructions: at most 4000 "
                     "characters).",
    "invalid_audio": "The audio is not base64 PCM16 at 24 kHz, or is too long for one event.",
    "input_audio_buffer_commit_empty": "There is no audio to commit.",
    "buffer_full": "The input audio buffer holds the longest turn already; commit or clear it first.",
    "no_input": "Nothing new to answer: add a user message or commit audio first.",
    "conversation_already_has_active_response": "A response is in progress; cancel it first.",
    "response_cancel_not_active": "There is no response in progress to cancel.",
    "item_not_found": "Only the latest assistant reply can be truncated.",
}


@dataclass(frozen=True)
class Setup:
    """The session's settings as the client sees them."""

    instructions: str
    voice: str | dict
    server_vad: bool = True
    silence_ms: int | None = None
    transcription: rt.Transcription | None = rt.Transcription(model="whisper")


class Refused(Exception):
    """A client event that is answered with an `error` and otherwise skipped."""

    def __init__(self, code: str, param: str | None = None, *, kind: str = "invalid_request_error") -> None:
        super().__init__(code)
        self.code, self.param, self.kind = code, param, kind


class RealtimeSession:
    """One /v1/realtime connection: socket, dispatch and the input audio; replies are Replies' job."""

    def __init__(self, engines: Engines, metrics: Metrics | None = None) -> None:
        self.engines = engines
        self.conversation = Conversation(engines, metrics)
        self.id = self.conversation.id
        self.limits = engines.settings.limits
        self.setup = Setup(instructions=engines.llm.settings.system_prompt, voice="default")
        self.replies = Replies(self.conversation.id, stop=lambda: self.conversation.interrupt(None, cause="client"))
        self._send_text: Callable[[str], Awaitable[None]] | None = None
        self._send_lock = asyncio.Lock()
        self._events = 0
        self._listener: Listener | None = None  # server VAD: the stream being listened to
        self._input: Resampler | None = None  # 24 kHz in -> 16 kHz for the listener
        self._buffer: list[np.ndarray] = []  # manual commits: the audio not yet committed (16 kHz)
        self._pending: list[UserItem] = []  # user items that response.create will answer

    # ------------------------------------------------------------ the socket

    async def serve(self, receive: Callable[[], Awaitable[dict]], send_text: Callable[[str], Awaitable[None]]) -> None:
        """Run until the client goes away; whatever happens, stop all work for this connection.
        Past max_sessions, say `busy` and close (1013, try again later)."""
        self._send_text = send_text
        if self.conversation.metrics.sessions_open() >= self.limits.max_sessions:
            await self._refuse()
        self.conversation.start()  # counted open from here: no await before it lets another in
        self.conversation.configure(self._options(self.setup))
        writer: asyncio.Task[None] | None = None
        try:
            await self._send(rt.SessionCreated(session=self._info()))
            writer = asyncio.create_task(self._write())
            while (message := await receive())["type"] != "websocket.disconnect":
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                if data is not None:
                    await self.on_message(data)
                self._check_backlog()
        finally:
            self._stop_listening()
            await self.conversation.close()
            if writer is not None:
                await writer
            log.info("realtime session %s closed", self.id)

    async def _refuse(self) -> None:
        log.warning("realtime session %s refused: %d sessions open (limits.max_sessions)", self.id,
                    self.conversation.metrics.sessions_open())
        await self._send(error_event(ev.error("busy")))
        raise WebSocketException(detail="busy", code=1013)

    def _check_backlog(self) -> None:
        """As on /ws: a client that keeps sending but never reads is closed past twice the cap."""
        waiting = self.conversation.backlog_bytes
        if waiting > 2 * self.limits.max_outgoing_bytes:
            log.warning("realtime session %s closed: the client sends but does not read (%d bytes wait)",
                        self.id, waiting)
            raise WebSocketException(detail="slow_client", code=1008)

    async def _send(self, event: rt.ServerEvent) -> bool:
        """Send one event with its id; False once the client is gone (the receive loop then ends)."""
        assert self._send_text is not None
        self._events += 1
        event.event_id = f"event_{self.id}_{self._events}"
        try:
            async with self._send_lock:  # the writer and the receive loop both send
                await self._send_text(rt.encode(event))
        except Exception:
            log.info("realtime session %s: send failed, client gone", self.id)
            return False
        return True

    async def _write(self) -> None:
        """The conversation's events, translated, in order."""
        while (event := await self.conversation.next_event()) is not None:
            for out in self.replies.translate(event, self._in_ms()):
                if not await self._send(out):
                    return

    # ------------------------------------------------------------ client events

    async def on_message(self, data: str | bytes) -> None:
        try:
            event = rt.decode_client(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._not_understood(data, exc)
            return
        try:
            for out in self._dispatch(event):
                await self._send(out)
        except Refused as refused:
            log.info("realtime session %s: refused %s: %s", self.id, type(event).__name__, refused.code)
            self.conversation.metrics.errors.labels(refused.code).inc()
            await self._send(refusal(refused, event.event_id))

    async def _not_understood(self, data: str | bytes, exc: Exception) -> None:
        seen = rt.envelope(data)
        known = seen.type in _HANDLED or seen.type is None
        code = "invalid_event" if known else "unknown_event"
        log.info("realtime session %s: skipped %s event %r: %s", self.id, code, seen.type, exc)
        self.conversation.metrics.errors.labels(code).inc()
        await self._send(refusal(Refused(code, param=None if known else "type"), seen.event_id))

    def _dispatch(self, event: rt.ClientEvent) -> list[rt.ServerEvent]:
        match event:
            case rt.SessionUpdate():
                return self._update(event.session)
            case rt.BufferAppend():
                self._append(event.audio)
            case rt.BufferCommit():
                return self._commit()
            case rt.BufferClear():
                self._buffer, self._input = [], None
                return [rt.Cleared()]
            case rt.ItemCreate():
                return self._create_item(event.item)
            case rt.ItemTruncate():
                return self._truncate(event)
            case rt.ResponseCreate():
                self._respond(event.response)
            case rt.ResponseCancel():
                if not self.replies.active:
                    raise Refused("response_cancel_not_active")
                if self.replies.cancel():
                    self.conversation.interrupt(None, cause="client")
        return []

    # ------------------------------------------------------------ session.update

    def _update(self, wanted: rt.SessionConfig) -> list[rt.ServerEvent]:
        """All or nothing, like /ws's hello: a value we cannot honour leaves the session as it was."""
        if wanted.type != "realtime":
            raise Refused("unsupported", "session.type")
        if wanted.tools or (wanted.output_modalities and wanted.output_modalities != ["audio"]):
            raise Refused("unsupported", "session.tools" if wanted.tools else "session.output_modalities")
        setup = self._merged(wanted)
        try:
            options = self._options(setup)
        except ValueError as exc:  # the Options' own checks (silence, prompt length)
            log.info("realtime session %s: refused settings: %s", self.id, exc)
            raise Refused("invalid_value", "session") from exc
        if not self._prompt_fits(options.system_prompt):
            raise Refused("too_long", "session.instructions")
        self.setup = setup
        self.replies.transcribe = setup.transcription is not None
        self.conversation.configure(options)
        if not setup.server_vad:
            self._stop_listening()  # speech in progress ends its turn, as when /ws's microphone stops
        return [rt.SessionUpdated(session=self._info())]

    def _merged(self, wanted: rt.SessionConfig) -> Setup:
        setup = self.setup
        if wanted.instructions is not msgspec.UNSET:
            setup = replace(setup, instructions=wanted.instructions)
        audio = wanted.audio if wanted.audio is not msgspec.UNSET else rt.AudioConfig()
        audio_in = audio.input if audio.input is not msgspec.UNSET else rt.AudioInputConfig()
        audio_out = audio.output if audio.output is not msgspec.UNSET else rt.AudioOutputConfig()
        for fmt, where in ((audio_in.format, "input"), (audio_out.format, "output")):
            if fmt is not msgspec.UNSET and (fmt.type != "audio/pcm" or fmt.rate not in (None, rt.RATE)):
                raise Refused("unsupported", f"session.audio.{where}.format")
        if audio_in.turn_detection is not msgspec.UNSET:
            vad = audio_in.turn_detection
            setup = replace(setup, server_vad=vad is not None,
                            silence_ms=vad.silence_duration_ms if vad is not None else setup.silence_ms)
        if audio_in.transcription is not msgspec.UNSET:
            setup = replace(setup, transcription=audio_in.transcription)
        if audio_out.voice is not msgspec.UNSET:
            setup = replace(setup, voice=audio_out.voice)
        return setup

    def _options(self, setup: Setup) -> ev.Options:
        """The core's options for `setup`; raises ValueError where they are out of range."""
        default = self.engines.llm.settings.system_prompt
        prompt = setup.instructions if setup.instructions and setup.instructions != default else None
        return ev.Options(system_prompt=prompt, end_silence_ms=setup.silence_ms, speaker=_speaker(setup.voice),
                          mode="hands_free" if setup.server_vad else "push_to_talk")

    def _prompt_fits(self, prompt: str | None) -> bool:
        if prompt is None:
            return True
        budget = system_prompt_budget(self.engines.llm.settings, self.limits.prompt_room_tokens)
        return self.engines.llm.count_tokens(prompt) <= budget

    def _info(self) -> rt.SessionInfo:
        s = self.setup
        vad = rt.VadInfo(silence_duration_ms=s.silence_ms) if s.server_vad else None
        audio = rt.AudioInfo(input=rt.InputInfo(rt.Format(), vad, s.transcription),
                             output=rt.OutputInfo(rt.Format(), s.voice))
        return rt.SessionInfo(id=f"sess_{self.id}", model=self.engines.describe()["llm"],
                              instructions=s.instructions, audio=audio)

    # ------------------------------------------------------------ input audio

    def _append(self, audio: str) -> None:
        pcm = _pcm16(audio)
        if self._input is None:
            self._input = Resampler(rt.RATE, ASR_RATE, "flt")
        self.replies.input_samples += len(pcm)
        heard = self._input.feed(pcm)
        if self.setup.server_vad:
            if self._listener is None:
                self._listener = self.conversation.listen()
            self._listener.feed(heard)
        elif sum(map(len, self._buffer)) + len(heard) > self.engines.settings.turns.max_turn_s * ASR_RATE:
            raise Refused("buffer_full")  # one committed turn is one core turn: never longer than that
        else:
            self._buffer.append(heard)

    def _commit(self) -> list[rt.ServerEvent]:
        """Manual turns: the buffer becomes a user item that response.create answers. With server VAD,
        speech in progress ends its turn now (as /ws's audio_stop), announced as usual."""
        if self.setup.server_vad:
            self._stop_listening()
            return []
        if self._input is not None:
            self._buffer.append(self._input.flush())
            self._input = None
        audio = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.float32)
        self._buffer = []
        if not len(audio):
            raise Refused("input_audio_buffer_commit_empty")
        item = UserItem(new_id("item"), audio=audio, seconds=len(audio) / ASR_RATE)
        return [rt.Committed(item_id=item.id, previous_item_id=self.replies.last_item_id),
                *self._add(item)]

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.end()  # speech in progress ends its turn
            self._listener = None
            self.conversation.stop_listening()

    def _in_ms(self) -> int:
        return self.replies.input_samples * 1000 // rt.RATE

    # ------------------------------------------------------------ items and responses

    def _create_item(self, wanted: rt.ItemIn) -> list[rt.ServerEvent]:
        if wanted.type != "message" or wanted.role != "user" or len(wanted.content) != 1:
            raise Refused("unsupported", "item")
        (part,) = wanted.content
        item_id = wanted.id or new_id("item")
        if part.type == "input_text" and part.text and part.text.strip():
            if len(part.text) > self.limits.max_text_chars:
                raise Refused("too_long", "item.content")
            return self._add(UserItem(item_id, text=part.text.strip()))
        if part.type == "input_audio" and part.audio:
            pcm = Resampler(rt.RATE, ASR_RATE, "flt").all(_pcm16(part.audio))
            if len(pcm) > self.engines.settings.turns.max_turn_s * ASR_RATE:
                raise Refused("too_long", "item.content")
            return self._add(UserItem(item_id, audio=pcm, seconds=len(pcm) / ASR_RATE))
        raise Refused("invalid_event", "item.content")

    def _add(self, item: UserItem) -> list[rt.ServerEvent]:
        self._pending.append(item)
        return self.replies.user_item_added(item)

    def _respond(self, params: rt.ResponseParams | None) -> None:
        """Answer the user items added since the last response, as one turn of the core."""
        if params is not None and (params.conversation == "none" or params.input is not None):
            raise Refused("unsupported", "response.conversation" if params.conversation == "none"
                          else "response.input")
        if self.replies.active:
            raise Refused("conversation_already_has_active_response")
        items, self._pending = self._pending, []
        if not items:
            raise Refused("no_input")
        audio = [item.audio for item in items if item.audio is not None]
        if audio and len(audio) < len(items):
            raise Refused("unsupported", "item.content")  # typed and spoken in one turn: not in the core
        if self.conversation.memory.still_playing():
            # The protocol's rule: a reply the client did not truncate was heard whole. Without this
            # the core would cut it by its playback clock, as for the page's typing over its voice.
            self.conversation.interrupt(self.replies.last_reply_samples)
        self.replies.request(items, spoken=bool(audio))
        if not audio:
            self.conversation.say("\n".join(item.text or "" for item in items))
            return
        self._stop_listening()
        options = self.conversation.options
        self.conversation.configure(msgspec.structs.replace(options, mode="push_to_talk"))
        listener = self.conversation.listen()  # push-to-talk: the turn is exactly this audio
        listener.feed(np.concatenate(audio))
        listener.end()
        self.conversation.stop_listening()
        self.conversation.configure(options)  # the ended listener keeps push-to-talk

    def _truncate(self, event: rt.ItemTruncate) -> list[rt.ServerEvent]:
        """The client played `audio_end_ms` of the latest reply: the history keeps what was heard."""
        if event.item_id != self.replies.last_reply_item or event.audio_end_ms < 0:
            raise Refused("item_not_found", "item_id")
        if self.replies.truncating(event.item_id):
            played = event.audio_end_ms * self.engines.tts.sample_rate // 1000  # in the voice's own samples
            self.conversation.interrupt(played)
        return [rt.ItemTruncated(item_id=event.item_id, content_index=event.content_index,
                                 audio_end_ms=event.audio_end_ms)]


_HANDLED = {cls.__struct_config__.tag for cls in rt.ClientEvent.__args__}  # type: ignore[attr-defined]


def _pcm16(data: str) -> np.ndarray:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused("invalid_audio", "audio") from exc
    if len(raw) % 2 or len(raw) > MAX_AUDIO_FRAME:
        raise Refused("invalid_audio", "audio")
    return np.frombuffer(raw, "<i2")


def _speaker(voice: str | dict) -> int | None:
    """CSM's speaker ids may be given as the voice ("4"); any other name keeps the default voice."""
    name = voice.get("id", "") if isinstance(voice, dict) else voice
    return int(name) if isinstance(name, str) and name.isdigit() else None


def refusal(refused: Refused, event_id: str | None) -> rt.Error:
    message = MESSAGES.get(refused.code) or ev.ERROR_MESSAGES[refused.code]
    return rt.Error(error=rt.ErrorInfo(refused.kind, refused.code, message, refused.param, event_id))

