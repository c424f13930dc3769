"""The OpenAI Realtime protocol on `/v1/realtime`: a second thin adapter over the conversation core.

Client events (app/web/realtime/protocol.py) become calls on the Conversation, like app/web/ws.py's page
messages; the conversation's events become the protocol's server events (app/web/realtime/replies.py),
its voice resampled to 24 kHz PCM16 in base64.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import msgspec
from litestar.exceptions import WebSocketException

from app.config import Settings
from app.core import events as ev
from app.core.conversation import Conversation
from app.core.metrics import Metrics
from app.engines.llm import system_prompt_budget
from app.engines.loaded import Engines
from app.web.incoming import Incoming
from app.web.realtime import protocol as rt
from app.web.realtime.audio_in import InputAudio
from app.web.realtime.errors import Refused, error_event, refusal
from app.web.realtime.formats import PCM, WireFormat, wire_format
from app.web.realtime.history import History
from app.web.realtime.items import Items, speaks, token_cap, tool_list, tool_set
from app.web.realtime.replies import Replies

log = logging.getLogger(__name__)

SETTLE_S = 5.0


@dataclass(frozen=True)
class Setup:
    """The session's settings as the client sees them."""

    instructions: str
    voice: str | dict
    turn_detection: rt.TurnDetection | None = rt.TurnDetection("server_vad")  # None: the client commits turns
    transcription: rt.Transcription | None = rt.Transcription(model="whisper")
    input_format: WireFormat = PCM
    output_format: WireFormat = PCM
    tools: tuple[rt.FunctionTool, ...] = ()
    tool_choice: rt.ToolChoice = "auto"
    modalities: tuple[str, ...] = ("audio",)
    max_output_tokens: int | str = "inf"

    @property
    def server_vad(self) -> bool:
        return self.turn_detection is not None

    def merged(self, wanted: rt.SessionConfig) -> Setup:
        """This setup with what session.update changes; Refused where a format is not one we can do."""
        setup = self
        if wanted.instructions is not msgspec.UNSET:
            setup = replace(setup, instructions=wanted.instructions)
        if wanted.tools is not msgspec.UNSET:
            setup = replace(setup, tools=tuple(wanted.tools))
        if wanted.tool_choice is not msgspec.UNSET:
            setup = replace(setup, tool_choice=wanted.tool_choice)
        if wanted.output_modalities is not msgspec.UNSET:
            setup = replace(setup, modalities=tuple(wanted.output_modalities))
        if wanted.max_output_tokens is not msgspec.UNSET:
            setup = replace(setup, max_output_tokens=wanted.max_output_tokens)
        audio = wanted.audio if wanted.audio is not msgspec.UNSET else rt.AudioConfig()
        audio_in = audio.input if audio.input is not msgspec.UNSET else rt.AudioInputConfig()
        audio_out = audio.output if audio.output is not msgspec.UNSET else rt.AudioOutputConfig()
        setup = replace(setup, input_format=wire_format(audio_in.format, setup.input_format, "input"),
                        output_format=wire_format(audio_out.format, setup.output_format, "output"))
        if audio_in.turn_detection is not msgspec.UNSET:
            setup = replace(setup, turn_detection=_checked(audio_in.turn_detection))
        if audio_in.transcription is not msgspec.UNSET:
            setup = replace(setup, transcription=audio_in.transcription)
        if audio_out.voice is not msgspec.UNSET:
            setup = replace(setup, voice=audio_out.voice)
        return setup

    def request(self) -> ev.ReplyRequest:
        """What every response of the session is, unless response.create says otherwise."""
        tools = tool_list(list(self.tools), "session")
        return ev.ReplyRequest(tools=tool_set(tools, self.tool_choice, "session"),
                               voice=speaks(list(self.modalities), "session"),
                               max_tokens=token_cap(self.max_output_tokens, "session"))


class RealtimeSession:
    """One /v1/realtime connection: the socket, event dispatch and session.update. The input audio is
    InputAudio's job (audio_in.py), items and responses Items' (items.py), the conversation's events
    Replies' (replies.py)."""

    def __init__(self, engines: Engines, settings: Settings, metrics: Metrics | None = None) -> None:
        self.engines = engines
        self.settings = settings
        self.conversation = Conversation(engines, settings, metrics)
        self.id = self.conversation.id
        self.limits = settings.limits
        self.setup = Setup(instructions=engines.llm.settings.system_prompt, voice="default")
        self.history = History(self.limits.max_items)
        # The client may edit the history: it is the items.
        self.conversation.memory.follow(self.history.messages, self._settled)
        self.replies = Replies(self.conversation.id, self.history,
                               stop=lambda: self.conversation.interrupt(None, cause="client"))
        self.audio = InputAudio(self.conversation, settings.turns.max_turn_s)
        self.items = Items(self.conversation, self.replies, self.audio, self.limits, self.history)
        self._send_text: Callable[[str], Awaitable[None]] | None = None
        self._send_lock = asyncio.Lock()
        self._events = 0
        self._translated = 0  # events of the conversation translated so far

    # ------------------------------------------------------------ the socket

    async def serve(self, receive: Callable[[], Awaitable[dict]], send_text: Callable[[str], Awaitable[None]]) -> None:
        """Run until the client goes away or its session ends (app/web/incoming.py: idle, or not reading); whatever
        happens, stop all work for this connection. Past max_sessions, say `busy` and close (1013, try again later)."""
        self._send_text = send_text
        if self.conversation.metrics.sessions_open() >= self.limits.max_sessions:
            await self._refuse()
        self.conversation.start()  # counted open from here: no await before it lets another in
        self.conversation.configure(self._options(self.setup))
        writer: asyncio.Task[None] | None = None
        incoming = Incoming(receive, self.conversation, self.limits, f"realtime session {self.id}")
        try:
            await self._send(rt.SessionCreated(session=self._info()))
            writer = asyncio.create_task(self._write())
            while (message := await incoming.next()) is not None:
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                if data is not None:
                    await self.on_message(data)
        finally:
            incoming.close()
            self.audio.stop_listening()
            await self.conversation.close()
            if writer is not None:
                await writer
            log.info("realtime session %s closed", self.id)

    async def _refuse(self) -> None:
        log.warning("realtime session %s refused: %d sessions open (limits.max_sessions)", self.id,
                    self.conversation.metrics.sessions_open())
        await self._send(error_event(ev.error("busy")))
        raise WebSocketException(detail="busy", code=1013)

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
            outs = self.replies.translate(event, self.audio.ms)
            self._translated += 1
            for out in outs:
                if not await self._send(out):
                    return

    async def _settled(self) -> None:
        """Until the events so far are translated: the items hold what was said, for the next reply to read
        (a client slow to read its events delays it, by SETTLE_S at most)."""
        outbox, deadline = self.conversation.outbox, time.monotonic() + SETTLE_S
        while (outbox.waiting or outbox.taken != self._translated) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    # ------------------------------------------------------------ client events

    async def on_message(self, data: str | bytes) -> None:
        try:
            event = rt.decode_client(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._not_understood(data, exc)
            return
        if not isinstance(event, rt.BufferAppend):  # the user at work (a silent microphone is not)
            self.conversation.idle.used()
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
                self.audio.append(event.audio, server_vad=self.setup.server_vad)
            case rt.BufferCommit():
                return self._commit()
            case rt.BufferClear():
                self.audio.clear()
                return [rt.Cleared()]
            case rt.ItemCreate():
                return self.items.create(event.item, event.previous_item_id)
            case rt.ItemRetrieve():
                return self.items.retrieve(event.item_id)
            case rt.ItemDelete():
                return self.items.delete(event.item_id)
            case rt.ItemTruncate():
                return self.items.truncate(event, self.engines.tts.sample_rate)
            case rt.ResponseCreate():
                self.items.respond(event.response)
            case rt.ResponseCancel():
                self.items.cancel()
        return []

    def _commit(self) -> list[rt.ServerEvent]:
        """Manual turns: the buffer becomes a user item that response.create answers. With server VAD,
        speech in progress ends its turn now (as /ws's audio_stop), announced as usual."""
        if self.setup.server_vad:
            self.audio.stop_listening()
            return []
        return self.items.commit()

    # ------------------------------------------------------------ session.update

    def _update(self, wanted: rt.SessionConfig) -> list[rt.ServerEvent]:
        """All or nothing, like /ws's hello: a value we cannot honour leaves the session as it was."""
        if wanted.type != "realtime":
            raise Refused("unsupported", "session.type")
        setup = self.setup.merged(wanted)
        request = setup.request()  # Refused where the tools, modalities or length are not ones we can do
        try:
            options = self._options(setup)
        except ValueError as exc:  # the Options' own checks (silence, prompt length)
            log.info("realtime session %s: refused settings: %s", self.id, exc)
            raise Refused("invalid_value", "session") from exc
        if not self._prompt_fits(options.system_prompt):
            raise Refused("too_long", "session.instructions")
        self.setup = setup
        self.items.defaults = self.conversation.defaults = request
        self.replies.transcribe = setup.transcription is not None
        self.replies.voice = request.voice
        self.audio.format, self.replies.output = setup.input_format, setup.output_format
        self.replies.answer_speech = options.answer_speech
        self.conversation.configure(options)
        if not setup.server_vad:
            self.audio.stop_listening()  # speech in progress ends its turn, as when /ws's microphone stops
        return [rt.SessionUpdated(session=self._info())]

    def _options(self, setup: Setup) -> ev.Options:
        """The core's options for `setup`; raises ValueError where they are out of range."""
        default = self.engines.llm.settings.system_prompt
        prompt = setup.instructions if setup.instructions and setup.instructions != default else None
        vad = setup.turn_detection
        return ev.Options(system_prompt=prompt, end_silence_ms=_silence_ms(vad), speaker=_speaker(setup.voice),
                          mode="hands_free" if vad is not None else "push_to_talk",
                          answer_speech=vad is None or vad.create_response,
                          barge_in=vad is None or vad.interrupt_response)

    def _prompt_fits(self, prompt: str | None) -> bool:
        if prompt is None:
            return True
        budget = system_prompt_budget(self.engines.llm.settings, self.limits.prompt_room_tokens)
        return self.engines.llm.count_tokens(prompt) <= budget

    def _info(self) -> rt.SessionInfo:
        s = self.setup
        audio = rt.AudioInfo(input=rt.InputInfo(s.input_format.info(), _vad_info(s.turn_detection), s.transcription),
                             output=rt.OutputInfo(s.output_format.info(), s.voice))
        return rt.SessionInfo(id=f"sess_{self.id}", model=self.settings.models()["llm"],
                              instructions=s.instructions, audio=audio, output_modalities=list(s.modalities),
                              tools=list(s.tools), tool_choice=s.tool_choice, max_output_tokens=s.max_output_tokens)


_HANDLED = {cls.__struct_config__.tag for cls in rt.ClientEvent.__args__}  # type: ignore[attr-defined]


# semantic_vad's eagerness as the silence that ends a turn the end rule is unsure of (ev.Options.end_silence_ms,
# which app/core/listening.py makes both the rule's unsure wait and its longest one; a sure verdict still ends
# the turn at the first pause). auto and medium keep the rule as it was calibrated (unsure 800 ms, at most
# 1300 ms: app/core/turns.py). high answers sooner, after 500 ms: under the longest pause inside the tuning
# half's sentences (0.64 s), so it may cut a sentence at a long pause, as OpenAI's high warns it may. low waits
# 2000 ms: past every thinking pause of tests/data/turns (0.5-1.2 s), for a speaker who pauses to think.
EAGERNESS_MS: dict[str, int | None] = {"high": 500, "medium": None, "auto": None, "low": 2000}


def _checked(vad: rt.TurnDetection | None) -> rt.TurnDetection | None:
    """Each type's own setting only: server_vad has a silence, semantic_vad an eagerness."""
    if vad is not None and vad.type == "semantic_vad" and vad.silence_duration_ms is not None:
        raise Refused("unsupported", "session.audio.input.turn_detection.silence_duration_ms")
    if vad is not None and vad.type == "server_vad" and vad.eagerness is not None:
        raise Refused("unsupported", "session.audio.input.turn_detection.eagerness")
    return vad


def _silence_ms(vad: rt.TurnDetection | None) -> int | None:
    if vad is None:
        return None
    return EAGERNESS_MS[vad.eagerness or "auto"] if vad.type == "semantic_vad" else vad.silence_duration_ms


def _vad_info(vad: rt.TurnDetection | None) -> rt.VadInfo | rt.SemanticVadInfo | None:
    if vad is None:
        return None
    if vad.type == "semantic_vad":
        return rt.SemanticVadInfo(eagerness=vad.eagerness or "auto", create_response=vad.create_response,
                                  interrupt_response=vad.interrupt_response)
    return rt.VadInfo(silence_duration_ms=vad.silence_duration_ms, create_response=vad.create_response,
                      interrupt_response=vad.interrupt_response)


def _speaker(voice: str | dict) -> int | None:
    """CSM's speaker ids may be given as the voice ("4"); any other name keeps the default voice."""
    name = voice.get("id", "") if isinstance(voice, dict) else voice
    return int(name) if isinstance(name, str) and name.isdigit() else None
