"""One conversation over one WebSocket: audio in, turns found, replies spoken, every turn ended.

Follow a turn: Recording (decoder thread: Opus -> PCM -> TurnDetector) hands a finished turn to
the session's queue; _answer() transcribes it, streams the LLM reply through the phrase chunker
into TTS, and sends PCM as soon as each chunk exists; its finally block always sends turn_end.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from . import protocol as p
from .audio import ASR_RATE, StreamDecoder
from .chunking import PhraseChunker
from .engines import Engines
from .llm import Message
from .turns import Event, StreamingVad, TurnDetector

log = logging.getLogger(__name__)

MAX_AUDIO_FRAME = 512 * 1024  # bytes; MediaRecorder sends ~2 KB every 100 ms


class StageError(Exception):
    """A model stage failed; `stage` names it for the error event."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(str(exc))
        self.stage = stage


@dataclass
class PendingTurn:
    id: int
    t_speech_end: float  # perf_counter() when the user stopped speaking (or sent text)
    t_decided: float  # when the end of the turn was decided
    audio: np.ndarray | None = None
    text: str | None = None


@dataclass
class Reply:
    """What has happened so far in answering one turn."""

    text: str = ""  # everything the LLM said
    spoken: list[str] = field(default_factory=list)  # phrases whose audio was all sent
    samples: int = 0
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())


class Recording:
    """One microphone stream: decodes on its own thread and reports turns to the session."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._loop = asyncio.get_running_loop()
        settings = session.engines.settings.turns
        if session.end_silence_ms is not None:
            settings = msgspec.structs.replace(settings, end_silence_ms=session.end_silence_ms)
        # A VAD state of its own: the previous recording's thread may still be draining.
        self.detector = TurnDetector(settings, StreamingVad(session.engines.vad_model))
        self.turns_found = 0
        self.decoder = StreamDecoder(self._on_pcm, self._on_end)

    def _on_pcm(self, pcm: np.ndarray) -> None:  # decoder thread
        for event in self.detector.feed(pcm):
            self._report(event)

    def _on_end(self, error: str | None) -> None:  # decoder thread
        if (event := self.detector.flush()) is not None:
            self._report(event)
        self._post(self._session.recording_ended, self, error)

    def _report(self, event: Event) -> None:
        if event is Event.SPEECH_STARTED:
            self._post(self._session.speech_started)
            return
        self.turns_found += 1
        audio, speech_end = self.detector.take_turn()
        now = time.perf_counter()
        # The stream runs in real time, so the speech ended as long ago as the audio after it.
        t_speech_end = now - (self.detector.position - speech_end) / ASR_RATE
        self._post(self._session.speech_turn, audio, t_speech_end, now)

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone: the session has ended
            pass


class Session:
    def __init__(self, engines: Engines) -> None:
        self.engines = engines
        self.id = uuid.uuid4().hex[:12]
        self.history: list[Message] = []
        self.system_prompt: str | None = None
        self.temperature: float | None = None
        self.end_silence_ms: int | None = None
        self._out: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._turns: asyncio.Queue[PendingTurn] = asyncio.Queue()
        self._turn_ids = itertools.count(1)
        self._recording: Recording | None = None
        self._voice = engines.tts.new_voice()
        self._current: asyncio.Task[None] | None = None
        self._state: p.State | None = None
        self._speaking_turn: int | None = None  # id given to the user's turn when speech began

    # ------------------------------------------------------------ socket plumbing

    async def serve(
        self,
        receive: Callable[[], Awaitable[dict]],
        send_text: Callable[[str], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Run until the client goes away; whatever happens, stop all work for this session."""
        writer = asyncio.create_task(self._write(send_text, send_bytes))
        runner = asyncio.create_task(self._run_turns())
        s = self.engines.describe()
        self.send(p.Ready(self.id, self.engines.tts.sample_rate, self.engines.settings.preset, **s))
        self.set_state("idle")
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    self.on_audio(message["bytes"])
                elif message.get("text") is not None:
                    self.on_control(message["text"])
        finally:
            runner.cancel()
            if self._current is not None:
                self._current.cancel()
            if self._recording is not None:
                self._recording.decoder.close()
            self._out.put_nowait(None)
            await asyncio.gather(runner, writer, return_exceptions=True)
            log.info("session %s closed", self.id)

    async def _write(
        self, send_text: Callable[[str], Awaitable[None]], send_bytes: Callable[[bytes], Awaitable[None]]
    ) -> None:
        # One writer keeps events and PCM in the order they were produced.
        while (item := await self._out.get()) is not None:
            try:
                await (send_bytes(item) if isinstance(item, bytes) else send_text(item))
            except Exception:  # the client vanished; the receive loop notices and cleans up
                log.info("session %s: send failed, client gone", self.id)
                return

    def send(self, event: p.ServerEvent) -> None:
        self._out.put_nowait(p.encode_event(event))

    def set_state(self, state: p.State) -> None:
        if state != self._state:
            self._state = state
            self.send(p.StateChanged(state))

    def _resting_state(self) -> p.State:
        return "listening" if self._recording is not None else "idle"

    # ------------------------------------------------------------ client messages

    def on_control(self, data: str) -> None:
        try:
            message = p.decode_client(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.send(p.Error("bad_message", f"Ignored a malformed message: {exc}"))
            return
        match message:
            case p.Hello():
                self.system_prompt = message.system_prompt
                self.temperature = message.temperature
                self.end_silence_ms = message.end_silence_ms
            case p.AudioStart():
                self.start_recording()
            case p.AudioStop():
                self.stop_recording()
            case p.UserText():
                now = time.perf_counter()
                self._enqueue(PendingTurn(next(self._turn_ids), now, now, text=message.text.strip()))
            case p.Interrupt():
                if self._current is not None:
                    self._current.cancel()
            case p.Reset():
                self.reset()

    def on_audio(self, data: bytes) -> None:
        if len(data) > MAX_AUDIO_FRAME:
            self.send(p.Error("bad_audio", "Ignored an audio frame larger than 512 KB."))
            return
        if self._recording is None:  # audio without audio_start: let the decoder probe it
            self.start_recording()
        assert self._recording is not None
        self._recording.decoder.feed(data)

    def start_recording(self) -> None:
        self.stop_recording()
        self._recording = Recording(self)
        if self._current is None:
            self.set_state("listening")

    def stop_recording(self) -> None:
        if self._recording is not None:
            self._recording.decoder.close()  # recording_ended() follows from its thread
            self._recording = None
            if self._current is None:
                self.set_state("idle")

    def reset(self) -> None:
        """New conversation: stop the reply, drop queued turns, forget the history."""
        while not self._turns.empty():
            turn = self._turns.get_nowait()
            self.send(p.TurnEnd(turn.id, "interrupted"))
        if self._current is not None:
            self._current.cancel()
        self.history.clear()
        self._voice = self.engines.tts.new_voice()

    # ------------------------------------------------------------ events from the recording

    def speech_started(self) -> None:
        self._speaking_turn = next(self._turn_ids)
        self.send(p.SpeechStarted(self._speaking_turn))

    def speech_turn(self, audio: np.ndarray, t_speech_end: float, t_decided: float) -> None:
        turn_id, self._speaking_turn = self._speaking_turn or next(self._turn_ids), None
        self.send(p.SpeechStopped())
        self._enqueue(PendingTurn(turn_id, t_speech_end, t_decided, audio=audio))

    def recording_ended(self, recording: Recording, error: str | None) -> None:
        if error is not None:
            self.send(p.Error("bad_audio", f"Could not decode the microphone audio ({error})."))
        if recording.turns_found == 0:  # the user stopped without saying anything
            turn_id = next(self._turn_ids)
            self.send(p.TurnEnd(turn_id, "no_speech"))
        if self._recording is recording:
            self._recording = None
            if self._current is None:
                self.set_state("idle")

    def _enqueue(self, turn: PendingTurn) -> None:
        self._turns.put_nowait(turn)

    # ------------------------------------------------------------ answering turns

    async def _run_turns(self) -> None:
        while True:
            turn = await self._turns.get()
            self._current = asyncio.create_task(self._answer(turn))
            await asyncio.wait({self._current})  # an interrupt cancels only this turn
            self._current = None
            self.set_state(self._resting_state())

    async def _answer(self, turn: PendingTurn) -> None:
        reply = Reply()
        reply.marks["end_of_turn"] = turn.t_decided
        reason, user_text = "completed", turn.text
        try:
            self.set_state("thinking")
            if user_text is None:
                user_text = await self._transcribe(turn.audio)
                reply.mark("transcript")
            if not user_text:
                reason = "no_speech"
                return
            self.send(p.Transcript(turn.id, user_text))
            await self._reply(turn.id, user_text, reply)
            if not reply.spoken:
                raise StageError("llm", RuntimeError("it returned an empty reply"))
        except asyncio.CancelledError:
            reason = "interrupted"
        except StageError as exc:
            reason = "error"
            log.error("session %s turn %d: %s failed", self.id, turn.id, exc.stage, exc_info=exc.__cause__)
            self.send(p.Error(f"{exc.stage}_failed", _failure_message(exc.stage, exc), turn.id))
        except Exception:
            reason = "error"
            log.exception("session %s turn %d failed", self.id, turn.id)
            self.send(p.Error("internal_error", "Sorry, something went wrong on the server.", turn.id))
        finally:
            self._finish_turn(turn, user_text, reply, reason)

    async def _transcribe(self, audio: np.ndarray | None) -> str:
        try:
            return await self.engines.asr_worker.run(self.engines.asr.transcribe, audio)
        except Exception as exc:
            raise StageError("asr", exc) from exc

    def _finish_turn(self, turn: PendingTurn, user_text: str | None, reply: Reply, reason: str) -> None:
        if reply.samples:
            self.send(p.ReplyAudioEnd(turn.id, reply.samples))
        spoken = " ".join(reply.spoken)
        if user_text and spoken:
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": spoken}]
        reply.mark("done")
        metrics = _metrics(turn, reply)
        self.send(metrics)
        self.send(p.TurnEnd(turn.id, reason, spoken))  # type: ignore[arg-type]
        log.info("session %s turn %d %s: voice-to-voice %s ms, total %s ms", self.id, turn.id,
                 reason, metrics.first_audio_ms, metrics.total_ms)

    async def _reply(self, turn_id: int, user_text: str, reply: Reply) -> None:
        """LLM -> phrases -> TTS as a pipeline: speech starts while the LLM is still writing."""
        messages = self.engines.llm.build_messages(self.history, user_text, self.system_prompt)
        phrases: asyncio.Queue[str | None] = asyncio.Queue()
        producer = asyncio.create_task(self._generate(turn_id, messages, phrases, reply))
        try:
            await self._speak(turn_id, phrases, reply)
            await producer  # raises what the LLM raised
        finally:
            producer.cancel()

    async def _generate(
        self, turn_id: int, messages: list[Message], phrases: asyncio.Queue[str | None], reply: Reply
    ) -> None:
        chunker = PhraseChunker(self.engines.settings.chunking)
        llm = self.engines.llm
        make = functools.partial(_llm_stream, llm, messages, self.temperature)
        try:
            async for delta in self.engines.llm_worker.stream(make):
                reply.mark("first_token")
                reply.text += delta
                self.send(p.ReplyText(turn_id, delta))
                for phrase in chunker.push(delta):
                    reply.mark("first_phrase")
                    phrases.put_nowait(phrase)
            for phrase in chunker.flush():
                reply.mark("first_phrase")
                phrases.put_nowait(phrase)
        except Exception as exc:
            raise StageError("llm", exc) from exc
        finally:
            phrases.put_nowait(None)

    async def _speak(self, turn_id: int, phrases: asyncio.Queue[str | None], reply: Reply) -> None:
        tts = self.engines.tts
        while (phrase := await phrases.get()) is not None:
            make = functools.partial(_tts_stream, tts, phrase, self._voice)
            try:
                async for chunk in self.engines.tts_worker.stream(make):
                    if not reply.samples:
                        self.send(p.ReplyAudioStart(turn_id, tts.sample_rate))
                        self.set_state("speaking")
                    self._out.put_nowait(chunk.astype("<i2").tobytes())
                    reply.samples += len(chunk)
                    reply.mark("first_audio")
            except Exception as exc:
                raise StageError("tts", exc) from exc
            reply.spoken.append(phrase)


def _llm_stream(llm, messages, temperature, cancel):  # runs on the LLM worker thread
    return llm.stream_reply(messages, temperature=temperature, cancel=cancel)


def _tts_stream(tts, phrase, voice, cancel):  # runs on the TTS worker thread
    return tts.synthesize(phrase, voice=voice, cancel=cancel)


def _failure_message(stage: str, exc: StageError) -> str:
    what = {"asr": "understand the audio", "llm": "write a reply", "tts": "speak the reply"}[stage]
    return f"Sorry, I could not {what}: {exc}"


def _metrics(turn: PendingTurn, reply: Reply) -> p.TurnMetrics:
    def ms(name: str) -> float | None:
        t = reply.marks.get(name)
        return None if t is None else round((t - turn.t_speech_end) * 1000, 1)

    return p.TurnMetrics(
        turn.id,
        end_of_turn_ms=ms("end_of_turn"),
        transcript_ms=ms("transcript"),
        first_token_ms=ms("first_token"),
        first_phrase_ms=ms("first_phrase"),
        first_audio_ms=ms("first_audio"),
        total_ms=ms("done"),
    )
