"""The conversation's events as OpenAI Realtime server events: user items, responses and their audio.

The core numbers turns; the protocol names items and responses. A turn the server's VAD found gets
its user item when speech starts and its response when it stops; a turn the client asked for with
response.create is the next new turn of the core, in order (one response at a time). Without
create_response, a VAD turn is committed and transcribed but not answered (app/web/realtime/heard.py).
"""

from __future__ import annotations

import base64
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np

from app.core import events as ev
from app.web.realtime import protocol as rt
from app.web.realtime.errors import error_event
from app.web.realtime.formats import PCM, WireFormat
from app.web.realtime.heard import InterimDeltas, NotAnswered, transcribed

NO_SPEECH = "Nothing was heard in the audio."


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Resampler:
    """Mono PCM16 from one rate to another as a stream: the filter's state carries across chunks,
    so the pieces join without clicks. out_format: "s16" (int16) or "flt" (float32)."""

    def __init__(self, src: int, dst: int, out_format: str = "s16") -> None:
        self.src = src
        self._dtype = np.int16 if out_format == "s16" else np.float32
        self._av = av.AudioResampler(format=out_format, layout="mono", rate=dst)

    def feed(self, pcm: np.ndarray) -> np.ndarray:
        if not len(pcm):
            return np.zeros(0, self._dtype)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = self.src
        return self._join(self._av.resample(frame))

    def flush(self) -> np.ndarray:
        """What the filter still holds, at the end of the stream."""
        return self._join(self._av.resample(None))

    def all(self, pcm: np.ndarray) -> np.ndarray:
        return np.concatenate([self.feed(pcm), self.flush()])

    def _join(self, frames: list[av.AudioFrame]) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(self._dtype) if parts else np.zeros(0, self._dtype)


@dataclass
class UserItem:
    id: str
    text: str | None = None  # typed
    audio: np.ndarray | None = None  # spoken (16 kHz float32), once committed
    seconds: float = 0.0
    transcript: str | None = None

    def info(self) -> rt.Item:
        if self.text is not None:
            return rt.Item(self.id, "user", [rt.Content("input_text", text=self.text)])
        status = "completed" if self.transcript is not None else "in_progress"
        return rt.Item(self.id, "user", [rt.Content("input_audio", transcript=self.transcript)], status)


@dataclass
class Response:
    id: str
    items: list[UserItem]
    spoken: bool
    conversation_id: str
    item_id: str = field(default_factory=lambda: new_id("item"))
    running: bool = False  # the core answers its turn (its transcript is out)
    started: bool = False  # its assistant item has been announced
    text: str = ""  # the transcript deltas sent
    voice: Resampler | None = None  # the reply's voice -> the output format's rate
    wire: WireFormat = PCM  # the output format when its voice began
    cancel_reason: str | None = None  # client_cancelled, else a cut is the user's speech
    error: ev.Error | None = None

    def info(self, status: str = "in_progress", details: rt.StatusDetails | None = None,
             output: list[rt.Item] | None = None) -> rt.ResponseInfo:
        return rt.ResponseInfo(self.id, status, output or [], self.conversation_id, details)  # type: ignore[arg-type]

    def item(self, transcript: str, status: str = "in_progress") -> rt.Item:
        return rt.Item(self.item_id, "assistant", [rt.Content("output_audio", transcript=transcript)],
                       status)  # type: ignore[arg-type]

    def where(self) -> dict[str, str]:
        return {"response_id": self.id, "item_id": self.item_id}


class Replies:
    """Turns the conversation's events into server events; keeps which response is which turn.
    `stop` cuts off the turn the conversation is answering (a cancel that came before it ran)."""

    def __init__(self, conversation_id: str, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.conversation_id = f"conv_{conversation_id}"
        self.transcribe = True  # send input transcription events (session's audio.input.transcription)
        self.output = PCM  # the session's audio.output.format, for replies that begin from now on
        self.last_item_id: str | None = None
        self.last_reply_item: str | None = None  # the latest assistant item
        self.last_reply_samples = 0  # how long its voice is, in the voice's own samples
        self._requests: deque[Response] = deque()  # asked for, its turn not seen yet
        self._turns: dict[int, Response] = {}  # turn -> its response, until the turn ends
        self._vad_items: dict[int, UserItem] = {}  # turns the VAD started, until they stop
        # create_response: the VAD's turns are answered at once, else they wait in not_answered
        self.answer_speech, self.not_answered, self._deltas = True, NotAnswered(), InterimDeltas()
        self._speaking: int | None = None

    @property
    def active(self) -> bool:
        return bool(self._requests or self._turns)

    # ------------------------------------------------------------ what the client did

    def user_item_added(self, item: UserItem) -> list[rt.ServerEvent]:
        out: list[rt.ServerEvent] = [rt.ItemAdded(item=item.info(), previous_item_id=self.last_item_id)]
        if item.text is not None:
            out.append(rt.ItemDone(item=item.info(), previous_item_id=self.last_item_id))
        self.last_item_id = item.id
        return out

    def request(self, items: list[UserItem], *, spoken: bool) -> None:
        self._requests.append(Response(new_id("resp"), items, spoken, self.conversation_id))

    def cancel(self) -> bool:
        """Mark the response in progress as cancelled by the client (there is one: see `active`).
        True: its turn runs, stop it now; False: it is stopped as soon as it runs (the core cuts
        off only the turn it is answering)."""
        newest = [*self._turns.values(), *self._requests][-1]
        newest.cancel_reason = "client_cancelled"
        return newest.running

    def truncating(self, item_id: str) -> bool:
        """Whether a truncate of `item_id` may stop what the conversation is doing: while that reply
        is still being made (then it is the client's cut), or when nothing else is; never another
        response that started since."""
        answering = [*self._turns.values(), *self._requests]
        for response in answering:
            if response.item_id == item_id:
                response.cancel_reason = "client_cancelled"
                return True
        return not answering

    # ------------------------------------------------------------ what the conversation did

    def translate(self, event: ev.Event, in_ms: int) -> list[rt.ServerEvent]:
        if getattr(event, "turn", None) in self.not_answered:
            return self.not_answered.translate(event, transcribe=self.transcribe)
        match event:
            case ev.SpeechStarted():
                return self._speech_started(event.turn, in_ms)
            case ev.SpeechStopped():
                return self._speech_stopped(in_ms)
            case ev.Transcript(final=True):
                return self._transcript(event)
            case ev.Transcript():  # interim, while the VAD's turn is spoken
                return self._deltas.delta(event, self._vad_items.get(event.turn)) if self.transcribe else []
            case ev.ReplyText():
                return self._reply_text(event)
            case ev.ReplyAudioStart():
                return self._audio_start(event)
            case ev.ReplyAudio():
                return self._audio(event)
            case ev.TurnEnd():
                return self._turn_end(event)
            case ev.Error():
                return self._error(event)
            case ev.ReplyAudioEnd():
                self.last_reply_samples = event.samples  # its 24 kHz tail goes out at TurnEnd
        return []  # states, interim transcripts and metrics

    def _find(self, turn: int, *, silent: bool = False) -> tuple[Response | None, list[rt.ServerEvent]]:
        """The response of `turn`; a new turn of the core is the next one asked for (a turn that
        ended `silent`, without speech, can only be one asked for with audio)."""
        if (response := self._turns.get(turn)) is not None:
            return response, []
        if turn in self._vad_items or not self._requests or (silent and not self._requests[0].spoken):
            return None, []
        response = self._requests.popleft()
        self._turns[turn] = response
        return response, [rt.ResponseCreated(response=response.info())]

    def _speech_started(self, turn: int, in_ms: int) -> list[rt.ServerEvent]:
        if self._requests and self._requests[0].spoken:  # the committed audio asked for: no VAD events
            return self._find(turn)[1]
        item = UserItem(new_id("item"), seconds=in_ms / 1000)  # its start, until it stops
        self._vad_items[turn], self._speaking = item, turn
        return [rt.SpeechStarted(audio_start_ms=in_ms, item_id=item.id)]

    def _speech_stopped(self, in_ms: int) -> list[rt.ServerEvent]:
        """The VAD's turn is committed and answered at once (create_response)."""
        turn, self._speaking = self._speaking, None
        if turn is None or (item := self._vad_items.pop(turn, None)) is None:
            return []  # a committed recording's end: nothing to announce
        item.seconds = max(0.0, in_ms / 1000 - item.seconds)
        previous, self.last_item_id = self.last_item_id, item.id
        out: list[rt.ServerEvent] = [rt.SpeechStopped(audio_end_ms=in_ms, item_id=item.id),
                                     rt.Committed(item_id=item.id, previous_item_id=previous),
                                     rt.ItemAdded(item=item.info(), previous_item_id=previous)]
        if not self.answer_speech:
            self.not_answered.committed(turn, item)
            return out
        response = Response(new_id("resp"), [item], True, self.conversation_id)
        self._turns[turn] = response
        return out + [rt.ResponseCreated(response=response.info())]

    def _transcript(self, event: ev.Transcript) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None:
            return out
        response.running = True
        if response.cancel_reason is not None:
            self._stop()  # cancelled before its turn ran; its TurnEnd follows
        return out + (self._heard(response, event.text) if response.spoken else [])

    def _heard(self, response: Response, text: str) -> list[rt.ServerEvent]:
        """The transcript of a spoken turn: it belongs to the last audio item it answers."""
        return transcribed(response.items[-1], text, transcribe=self.transcribe)

    def _output(self, response: Response) -> list[rt.ServerEvent]:
        """Announce the reply's assistant item once, before its first text or audio."""
        if response.started or response.cancel_reason is not None:
            return []
        response.started = True
        previous, self.last_item_id = self.last_item_id, response.item_id
        self.last_reply_item = response.item_id
        item = response.item("")
        return [rt.OutputItemAdded(response_id=response.id, item=item),
                rt.ItemAdded(item=item, previous_item_id=previous),
                rt.PartAdded(part=rt.Part(), **response.where())]

    def _reply_text(self, event: ev.ReplyText) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None:
            return out
        out += self._output(response)
        if not response.started:
            return out  # cancelled before it began: it says nothing
        response.text += event.delta
        return out + [rt.TranscriptDelta(delta=event.delta, **response.where())]

    def _audio_start(self, event: ev.ReplyAudioStart) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None:
            return out
        out += self._output(response)
        if response.started:
            response.voice, response.wire = Resampler(event.sample_rate, self.output.rate), self.output
        return out

    def _audio(self, event: ev.ReplyAudio) -> list[rt.ServerEvent]:
        response = self._turns.get(event.turn)
        if response is None or response.voice is None:
            return []
        return _delta(response, response.voice.feed(event.pcm))

    def _error(self, event: ev.Error) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn) if event.turn is not None else (None, [])
        if response is not None:
            response.error = event
        return out + [error_event(event)]

    def _turn_end(self, event: ev.TurnEnd) -> list[rt.ServerEvent]:
        self._vad_items.pop(event.turn, None)
        response, out = self._find(event.turn, silent=event.reason == "no_speech")
        if response is None:
            return out
        del self._turns[event.turn]
        if response.spoken and response.items[-1].transcript is None and event.reason == "no_speech":
            out += self._heard(response, "")
        if response.started:
            out += self._close_output(response, event)
        status, details = _status(response, event.reason)
        output = [response.item(event.reply, "completed" if status == "completed" else "incomplete")]
        return out + [rt.ResponseDone(response=response.info(status, details, output if response.started else []))]

    def _close_output(self, response: Response, end: ev.TurnEnd) -> list[rt.ServerEvent]:
        """The reply's audio, transcript, part and item are done; a cut reply's voice stops where it was."""
        out: list[rt.ServerEvent] = []
        if response.voice is not None and end.reason == "completed":
            out += _delta(response, response.voice.flush())
        if response.voice is not None:
            out.append(rt.AudioDone(**response.where()))
        status = "completed" if end.reason == "completed" else "incomplete"
        item = response.item(end.reply, status)
        return out + [rt.TranscriptDone(transcript=response.text, **response.where()),
                      rt.PartDone(part=rt.Part(transcript=end.reply), **response.where()),
                      rt.OutputItemDone(response_id=response.id, item=item),
                      rt.ItemDone(item=item)]


def _delta(response: Response, pcm: np.ndarray) -> list[rt.ServerEvent]:
    if not len(pcm):
        return []
    data = base64.b64encode(response.wire.encode(pcm)).decode()
    return [rt.AudioDelta(delta=data, **response.where())]


def _status(response: Response, reason: str) -> tuple[str, rt.StatusDetails | None]:
    if reason == "completed":
        return "completed", None
    if reason == "interrupted":
        return "cancelled", rt.StatusDetails("cancelled", response.cancel_reason or "turn_detected")
    if reason == "no_speech":
        error = rt.ErrorInfo("invalid_request_error", "no_speech", NO_SPEECH)
    else:
        error = error_event(response.error or ev.error("internal_error")).error
    return "failed", rt.StatusDetails("failed", error=error)
