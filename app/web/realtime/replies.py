"""The conversation's events as OpenAI Realtime server events: user items, responses and their audio.

The core numbers turns; the protocol names items and responses. A turn the server's VAD found gets
its user item when speech starts and its response when it stops; a turn the client asked for with
response.create is the next new turn of the core, in order (one response at a time). Without
create_response, a VAD turn is committed and transcribed but not answered (app/web/realtime/heard.py).
"""

from __future__ import annotations

import base64
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
from app.web.realtime.history import Entry, History, new_id
from app.web.realtime.usage import usage

NO_SPEECH = "Nothing was heard in the audio."
__all__ = ["Replies", "Resampler", "Response", "new_id"]


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
class Response:
    """One response: the user items it answers, how it was asked for, and the items it makes."""

    id: str
    items: list[Entry]  # the user items it answers; spoken ones get its transcript
    spoken: bool  # it answers audio, which the core transcribes
    conversation_id: str | None  # None: out of band, it stays out of the conversation's items
    voice: bool = True  # it speaks; False: text only
    metadata: dict[str, str] | None = None
    running: bool = False  # the core answers its turn
    cancel_reason: str | None = None  # client_cancelled, else a cut is the user's speech
    error: ev.Error | None = None
    message: Entry | None = None  # its assistant message, once it says something
    calls: dict[int, Entry] = field(default_factory=dict)  # its function calls, by the model's index
    outputs: list[Entry] = field(default_factory=list)  # all it made, in order: the output_index
    audio_out: Resampler | None = None  # the reply's voice -> the output format's rate
    wire: WireFormat = PCM  # the output format when its voice began
    tokens: tuple[int, int] = (0, 0)  # the language model's input and output tokens
    audio_s: float = 0.0  # seconds of voice sent

    def info(self, status: str = "in_progress", details: rt.StatusDetails | None = None,
             usage: rt.ResponseUsage | None = None) -> rt.ResponseInfo:
        output = [entry.info() for entry in self.outputs] if status != "in_progress" else []
        modalities = ["audio"] if self.voice else ["text"]
        return rt.ResponseInfo(self.id, status, output, self.conversation_id, details,  # type: ignore[arg-type]
                               output_modalities=modalities, usage=usage, metadata=self.metadata)

    def where(self) -> dict[str, str | int]:
        assert self.message is not None
        return {"response_id": self.id, "item_id": self.message.id, "output_index": self.outputs.index(self.message)}

    def usage(self) -> rt.ResponseUsage:
        heard_s = sum(item.seconds for item in self.items if item.spoken)
        return usage(self.tokens, heard_s, self.audio_s)


class Replies:
    """Turns the conversation's events into server events; keeps which response is which turn, and puts
    what each response makes into the history. `stop` cuts off the turn the conversation is answering
    (a cancel that came before it ran)."""

    def __init__(self, conversation_id: str, history: History, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.history = history
        self.conversation_id = f"conv_{conversation_id}"
        self.transcribe = True  # send input transcription events (session's audio.input.transcription)
        self.voice = True  # the session's output modality for the responses its VAD starts
        self.output = PCM  # the session's audio.output.format, for replies that begin from now on
        # create_response: the VAD's turns are answered at once, else they wait in not_answered
        self.answer_speech, self.not_answered, self._deltas = True, NotAnswered(), InterimDeltas()
        self.last_reply_item: str | None = None  # the latest assistant item
        self.last_reply_samples = 0  # how long its voice is, in the voice's own samples
        self._requests: deque[Response] = deque()  # asked for, its turn not seen yet
        self._turns: dict[int, Response] = {}  # turn -> its response, until the turn ends
        self._vad_items: dict[int, Entry] = {}  # turns the VAD started, until they stop
        self._speaking: int | None = None


    # ------------------------------------------------------------ what the client did

    def request(self, response: Response) -> None:
        self._requests.append(response)

    def answering(self) -> list[Response]:
        """The responses asked for and not done yet, oldest first."""
        return [*self._turns.values(), *self._requests]

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
            case ev.ReplyCall():
                return self._reply_call(event)
            case ev.ReplyAudioStart():
                return self._audio_start(event)
            case ev.ReplyAudio():
                return self._audio(event)
            case ev.TurnMetrics():
                if (response := self._turns.get(event.turn)) is not None:
                    response.tokens = (event.input_tokens, event.output_tokens)
            case ev.TurnEnd():
                return self._turn_end(event)
            case ev.Error():
                return self._error(event)
            case ev.ReplyAudioEnd():
                self.last_reply_samples = event.samples  # its 24 kHz tail goes out at TurnEnd
        return []  # states, interim transcripts

    def _find(self, turn: int, *, silent: bool = False) -> tuple[Response | None, list[rt.ServerEvent]]:
        """The response of `turn`; a new turn of the core is the next one asked for (a turn that
        ended `silent`, without speech, can only be one asked for with audio)."""
        if (response := self._turns.get(turn)) is not None:
            return response, []
        if turn in self._vad_items or not self._requests or (silent and not self._requests[0].spoken):
            return None, []
        response = self._requests.popleft()
        self._turns[turn] = response
        response.running = True
        if response.cancel_reason is not None:
            self._stop()  # cancelled before its turn ran; its TurnEnd follows
        return response, [rt.ResponseCreated(response=response.info())]

    def _speech_started(self, turn: int, in_ms: int) -> list[rt.ServerEvent]:
        if self._requests and self._requests[0].spoken:  # the committed audio asked for: no VAD events
            return self._find(turn)[1]
        item = Entry(new_id("item"), spoken=True, seconds=in_ms / 1000, status="in_progress")  # its start, for now
        self._vad_items[turn], self._speaking = item, turn
        return [rt.SpeechStarted(audio_start_ms=in_ms, item_id=item.id)]

    def _speech_stopped(self, in_ms: int) -> list[rt.ServerEvent]:
        """The VAD's turn is committed and answered at once (create_response)."""
        turn, self._speaking = self._speaking, None
        if turn is None or (item := self._vad_items.pop(turn, None)) is None:
            return []  # a committed recording's end: nothing to announce
        item.seconds = max(0.0, in_ms / 1000 - item.seconds)
        previous = self.history.add(item)
        out: list[rt.ServerEvent] = [rt.SpeechStopped(audio_end_ms=in_ms, item_id=item.id),
                                     rt.Committed(item_id=item.id, previous_item_id=previous),
                                     rt.ItemAdded(item=item.info(), previous_item_id=previous)]
        if not self.answer_speech:
            self.not_answered.committed(turn, item)
            return out
        response = Response(new_id("resp"), [item], True, self.conversation_id, voice=self.voice, running=True)
        self._turns[turn] = response
        return out + [rt.ResponseCreated(response=response.info())]

    def _transcript(self, event: ev.Transcript) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None or not response.spoken:
            return out
        return out + self._heard(response, event.text)

    def _heard(self, response: Response, text: str) -> list[rt.ServerEvent]:
        """The transcript of a spoken turn: it belongs to the last audio item it answers."""
        return transcribed(response.items[-1], text, transcribe=self.transcribe)

    def _new_output(self, response: Response, entry: Entry) -> list[rt.ServerEvent]:
        """An item the response makes: announced, and in the conversation unless it is out of band."""
        response.outputs.append(entry)
        out: list[rt.ServerEvent] = [rt.OutputItemAdded(response_id=response.id, item=entry.info(),
                                                        output_index=len(response.outputs) - 1)]
        if response.conversation_id is not None:
            previous = self.history.add(entry)
            out.append(rt.ItemAdded(item=entry.info(), previous_item_id=previous))
        return out

    def _output(self, response: Response) -> list[rt.ServerEvent]:
        """Announce the reply's assistant message once, before its first text or audio."""
        if response.message is not None or response.cancel_reason is not None:
            return []
        response.message = Entry(new_id("item"), role="assistant", text="", spoken=response.voice,
                                 status="in_progress")
        if response.voice:
            self.last_reply_item = response.message.id
        part = rt.Part("audio", transcript="") if response.voice else rt.Part("text", text="")
        return self._new_output(response, response.message) + [rt.PartAdded(part=part, **response.where())]

    def _reply_text(self, event: ev.ReplyText) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None:
            return out
        out += self._output(response)
        if response.message is None:
            return out  # cancelled before it began: it says nothing
        response.message.text = (response.message.text or "") + event.delta
        delta = rt.TranscriptDelta if response.voice else rt.TextDelta
        return out + [delta(delta=event.delta, **response.where())]

    def _reply_call(self, event: ev.ReplyCall) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None or response.cancel_reason is not None:
            return out
        call = event.call
        if (entry := response.calls.get(call.index)) is None:
            entry = Entry(new_id("item"), kind="function_call", call_id=call.call_id, name=call.name,
                          status="in_progress")
            response.calls[call.index] = entry
            out += self._new_output(response, entry)
        entry.arguments += call.arguments
        return out + [rt.ArgumentsDelta(response_id=response.id, item_id=entry.id, call_id=entry.call_id,
                                        delta=call.arguments, output_index=response.outputs.index(entry))]

    def _audio_start(self, event: ev.ReplyAudioStart) -> list[rt.ServerEvent]:
        response, out = self._find(event.turn)
        if response is None:
            return out
        out += self._output(response)
        if response.message is not None:
            response.audio_out, response.wire = Resampler(event.sample_rate, self.output.rate), self.output
        return out

    def _audio(self, event: ev.ReplyAudio) -> list[rt.ServerEvent]:
        response = self._turns.get(event.turn)
        if response is None or response.audio_out is None:
            return []
        return _delta(response, response.audio_out.feed(event.pcm))

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
        if response.spoken and response.items[-1].text is None and event.reason == "no_speech":
            out += self._heard(response, "")
        status = "completed" if event.reason == "completed" else "incomplete"
        if response.message is not None:
            out += _close_message(response, event, status)
        for entry in response.calls.values():
            out += _close_call(response, entry, status)
        done, details = _status(response, event.reason)
        return out + [rt.ResponseDone(response=response.info(done, details, response.usage()))]


def _close_message(response: Response, end: ev.TurnEnd, status: str) -> list[rt.ServerEvent]:
    """The reply's audio, transcript (or text), part and item are done; a cut reply stops where it was."""
    message, out = response.message, []
    assert message is not None
    if response.audio_out is not None and end.reason == "completed":
        out += _delta(response, response.audio_out.flush())
    if response.audio_out is not None:
        out.append(rt.AudioDone(**response.where()))
    sent, message.text, message.status = message.text or "", end.reply, status
    if response.voice:
        out += [rt.TranscriptDone(transcript=sent, **response.where()),
                rt.PartDone(part=rt.Part("audio", transcript=end.reply), **response.where())]
    else:
        out += [rt.TextDone(text=sent, **response.where()),
                rt.PartDone(part=rt.Part("text", text=end.reply), **response.where())]
    return out + _item_done(response, message)


def _close_call(response: Response, entry: Entry, status: str) -> list[rt.ServerEvent]:
    entry.status = status
    done = rt.ArgumentsDone(response_id=response.id, item_id=entry.id, call_id=entry.call_id, name=entry.name,
                            arguments=entry.arguments, output_index=response.outputs.index(entry))
    return [done, *_item_done(response, entry)]


def _item_done(response: Response, entry: Entry) -> list[rt.ServerEvent]:
    out: list[rt.ServerEvent] = [rt.OutputItemDone(response_id=response.id, item=entry.info(),
                                                   output_index=response.outputs.index(entry))]
    if response.conversation_id is not None:
        out.append(rt.ItemDone(item=entry.info()))
    return out


def _delta(response: Response, pcm: np.ndarray) -> list[rt.ServerEvent]:
    if not len(pcm):
        return []
    response.audio_s += len(pcm) / response.wire.rate
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
