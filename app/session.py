"""One conversation over one WebSocket: audio in, turns found, replies spoken, every turn ended.

Follow a turn: Recording (decoder thread: Opus -> PCM -> TurnDetector) hands a finished turn to
the session's queue; _answer() transcribes it, streams the LLM reply through the phrase chunker
into TTS, and sends PCM as soon as each chunk exists; its finally block always sends turn_end.
Speech that starts while the assistant thinks or talks cuts the reply off (barge-in).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from . import protocol as p
from .audio import ASR_RATE, StreamDecoder
from .chunking import PhraseChunker
from .engines import Engines
from .llm import Message
from .metrics import Metrics
from .reply import Reply
from .turns import Event, StreamingVad, TurnDetector

log = logging.getLogger(__name__)

MAX_AUDIO_FRAME = 512 * 1024  # bytes; MediaRecorder sends ~2 KB every 100 ms
CARRY_GAP = np.zeros(ASR_RATE // 5, np.float32)  # between a resumed turn's two parts


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


class Recording:
    """One microphone stream: decodes on its own thread and reports turns to the session."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._loop = asyncio.get_running_loop()
        # A VAD state of its own: the previous recording's thread may still be draining.
        vad = StreamingVad(session.engines.vad_model)
        self.detector = TurnDetector(session.engines.settings.turns, vad)
        self.apply(session.options)
        self.turns_found = 0
        self.decoder = StreamDecoder(self._on_pcm, self._on_end)

    def apply(self, options: p.Hello) -> None:
        """Hands-free or push-to-talk, and the pause that ends a turn; also for the turn being
        spoken (the detector reads them on the decoder thread at its next 32 ms window)."""
        push_to_talk = options.mode == "push_to_talk"
        self.detector.set_end(end_silence_ms=options.end_silence_ms, push_to_talk=push_to_talk)

    def _on_pcm(self, pcm: np.ndarray) -> None:  # decoder thread
        self.detector.strict = time.perf_counter() < self._session.playback_end
        for event in self.detector.feed(pcm):
            self._report(event)

    def _on_end(self, error: str | None) -> None:  # decoder thread
        if (event := self.detector.flush()) is not None:
            self._report(event)
        self._post(self._session.recording_ended, self, error)

    def _report(self, event: Event) -> None:
        if event is Event.SPEECH_STARTED:
            self._post(self._session.speech_started)
        elif event is Event.INTERIM:
            self._post(self._session.interim, self.detector.snapshot())
        else:
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
    def __init__(self, engines: Engines, metrics: Metrics | None = None) -> None:
        self.engines = engines
        self.metrics = metrics or Metrics()
        self.id = uuid.uuid4().hex[:12]
        self.options = p.Hello()
        self.history: list[Message] = []
        self.playback_end = 0.0  # perf_counter() when the page will have played all reply audio
        self._out: asyncio.Queue[str | tuple[int, bytes] | None] = asyncio.Queue()
        self._turns: asyncio.Queue[PendingTurn] = asyncio.Queue()
        self._turn_ids = itertools.count(1)
        self._recording: Recording | None = None
        self._voice = engines.tts.new_voice()
        self._current: asyncio.Task[None] | None = None
        self._active: tuple[PendingTurn, Reply] | None = None  # the turn being answered
        self._state: p.State | None = None
        self._speaking_turn: int | None = None  # id given to the user's turn when speech began
        self._last_reply: Reply | None = None  # the latest reply that had audio
        self._silenced: set[int] = set()  # turns whose queued audio must not go out any more
        self._cut: tuple[str, int | None] | None = None  # why the running turn is cancelled
        self._carry: np.ndarray | None = None  # speech of a turn the user went on talking over
        self._interim_busy = False
        self._background: set[asyncio.Task[None]] = set()

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
        self.metrics.sessions.inc()
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
            self.metrics.sessions.dec()
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
            if isinstance(item, tuple) and item[0] in self._silenced:
                continue  # audio of a reply the user cut off
            try:
                await (send_bytes(item[1]) if isinstance(item, tuple) else send_text(item))
            except Exception:  # the client vanished; the receive loop notices and cleans up
                log.info("session %s: send failed, client gone", self.id)
                return

    def send(self, event: p.ServerEvent) -> None:
        if isinstance(event, p.Error):
            self.metrics.errors.labels(event.code).inc()
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
                if message.speaker != self.options.speaker:  # a new voice starts a fresh memory
                    self._voice = self.engines.tts.new_voice(message.speaker)
                self.options = message
                if self._recording is not None:  # the user switched mode or pause mid-sentence
                    self._recording.apply(message)
            case p.AudioStart():
                self.start_recording()
            case p.AudioStop():
                self.stop_recording()
            case p.UserText():
                now = time.perf_counter()
                self.interrupt("client", None)  # typing while it talks means "stop, listen to this"
                self._turns.put_nowait(PendingTurn(next(self._turn_ids), now, now, text=message.text.strip()))
            case p.Interrupt():
                self.interrupt("client", message.played_samples)
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
        self.interrupt("reset", None)
        self.history.clear()
        self._last_reply = None
        self._carry = None
        self._voice = self.engines.tts.new_voice(self.options.speaker)

    # ------------------------------------------------------------ barge-in

    def interrupt(self, cause: str, played: int | None) -> None:
        """Stop the reply: cancel the running turn, or trim what the history says was heard."""
        if self._current is not None and not self._current.done() and self._active is not None:
            turn, reply = self._active
            self._cut = (cause, played)
            self._silenced.add(turn.id)  # queued audio stops now, not when the task unwinds
            if cause == "speech" and not reply.samples and turn.audio is not None:
                self._carry = turn.audio  # cut off before it spoke: the user was not done yet
            self._current.cancel()
        elif self._last_reply is not None and (played is not None or self._last_reply.still_playing()):
            self._forget_unheard(self._last_reply, played)
        self.playback_end = 0.0

    def _forget_unheard(self, reply: Reply, played: int | None) -> None:
        """A finished reply was cut off while the page still played it: keep only what was heard."""
        index = reply.history_index
        if index is None or index != len(self.history) - 1:
            return  # a newer exchange followed; this one is no longer the last word
        heard = reply.heard(reply.played_estimate() if played is None else played)
        if heard:
            self.history[index]["content"] = heard
        else:
            del self.history[index - 1 :]  # nothing heard: the exchange never happened
        reply.history_index = None
        self.metrics.barge_ins.inc()

    # ------------------------------------------------------------ events from the recording

    def speech_started(self) -> None:
        self._speaking_turn = next(self._turn_ids)
        self.send(p.SpeechStarted(self._speaking_turn))
        if self._current is not None or (self._last_reply and self._last_reply.still_playing()):
            self.interrupt("speech", None)

    def interim(self, audio: np.ndarray) -> None:
        turn_id = self._speaking_turn
        if turn_id is None or self._interim_busy:
            return  # one interim at a time: never let guesses queue up before the final
        self._interim_busy = True
        task = asyncio.create_task(self._send_interim(turn_id, audio))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_interim(self, turn_id: int, audio: np.ndarray) -> None:
        try:
            text = await self.engines.asr_worker.run(self.engines.asr.transcribe, audio)
        except Exception:
            log.warning("session %s: interim transcript failed", self.id, exc_info=True)
            return
        finally:
            self._interim_busy = False
        if text and self._speaking_turn == turn_id:  # the final transcript has not overtaken it
            self.send(p.Transcript(turn_id, text, final=False))

    def speech_turn(self, audio: np.ndarray, t_speech_end: float, t_decided: float) -> None:
        turn_id, self._speaking_turn = self._speaking_turn or next(self._turn_ids), None
        if self._carry is not None:  # the user had paused, not finished: answer both parts
            audio, self._carry = np.concatenate([self._carry, CARRY_GAP, audio]), None
        self.send(p.SpeechStopped())
        self._turns.put_nowait(PendingTurn(turn_id, t_speech_end, t_decided, audio=audio))

    def recording_ended(self, recording: Recording, error: str | None) -> None:
        if error is not None:
            self.send(p.Error("bad_audio", f"Could not decode the microphone audio ({error})."))
        if recording.turns_found == 0:  # the user stopped without saying anything
            turn_id = self._speaking_turn or next(self._turn_ids)
            self._speaking_turn = None
            self.metrics.turns.labels("no_speech").inc()  # a turn like any other: counted by reason
            self.send(p.TurnEnd(turn_id, "no_speech"))
        if self._recording is recording:
            self._recording = None
            if self._current is None:
                self.set_state("idle")

    # ------------------------------------------------------------ answering turns

    async def _run_turns(self) -> None:
        while True:
            turn = await self._turns.get()
            self._cut = None
            self._active = (turn, Reply(self.engines.tts.sample_rate))
            self._current = asyncio.create_task(self._answer(*self._active))
            await asyncio.wait({self._current})  # an interrupt cancels only this turn
            self._current, self._active = None, None
            self.set_state(self._resting_state())

    async def _answer(self, turn: PendingTurn, reply: Reply) -> None:
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
            if not reply.phrases:
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
        said = reply.spoken
        if reason == "interrupted":
            played = self._cut[1] if self._cut and self._cut[1] is not None else reply.played_estimate()
            said = reply.heard(played)
            self.metrics.barge_ins.inc()
        # A reset cut this turn off: it belongs to the conversation that was just forgotten.
        forgotten = self._cut is not None and self._cut[0] == "reset"
        if user_text and said and not forgotten:
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": said}]
            reply.history_index = len(self.history) - 1
        if reply.samples:
            # An interrupted reply stopped playing with it: nothing of it can be cut off later.
            self._last_reply = None if reason == "interrupted" else reply
        reply.mark("done")
        metrics = _metrics(turn, reply)
        self.metrics.observe_turn(metrics, reason)
        self.send(metrics)
        self.send(p.TurnEnd(turn.id, reason, said))  # type: ignore[arg-type]
        log.info("session %s turn %d %s: voice-to-voice %s ms, total %s ms", self.id, turn.id,
                 reason, metrics.first_audio_ms, metrics.total_ms)

    async def _reply(self, turn_id: int, user_text: str, reply: Reply) -> None:
        """LLM -> phrases -> TTS as a pipeline: speech starts while the LLM is still writing.

        The settings are read once here: a `hello` sent meanwhile applies from the next reply.
        """
        options, voice = self.options, self._voice
        messages = self.engines.llm.build_messages(self.history, user_text, options.system_prompt)
        phrases: asyncio.Queue[str | None] = asyncio.Queue()
        writing = self._generate(turn_id, messages, options.temperature, phrases, reply)
        producer = asyncio.create_task(writing)
        try:
            await self._speak(turn_id, phrases, voice, reply)
            await producer  # raises what the LLM raised
        finally:
            producer.cancel()

    async def _generate(
        self,
        turn_id: int,
        messages: list[Message],
        temperature: float | None,
        phrases: asyncio.Queue[str | None],
        reply: Reply,
    ) -> None:
        llm, chunker = self.engines.llm, PhraseChunker(self.engines.settings.chunking)
        try:
            prompt = await self.engines.llm_worker.run(llm.prompt, messages)
            used, finished = 0, False
            while not finished and used < llm.settings.max_tokens:
                # One slice per worker job, so other sessions' replies interleave with this one.
                size = min(llm.settings.slice_tokens, llm.settings.max_tokens - used)
                make = functools.partial(_llm_slice, llm, prompt, reply.text, size, temperature)
                got = 0
                async for piece, stop in self.engines.llm_worker.stream(make):
                    got, finished = got + 1, finished or stop
                    if piece:
                        self._add_text(turn_id, piece, chunker, phrases, reply)
                used += got
                finished = finished or got < size  # a stop string or a full context ends it too
            for phrase in chunker.flush():
                reply.mark("first_phrase")
                phrases.put_nowait(phrase)
        except Exception as exc:
            raise StageError("llm", exc) from exc
        finally:
            phrases.put_nowait(None)

    def _add_text(
        self, turn_id: int, piece: str, chunker: PhraseChunker, phrases: asyncio.Queue[str | None], reply: Reply
    ) -> None:
        reply.mark("first_token")
        reply.text += piece
        self.send(p.ReplyText(turn_id, piece))
        for phrase in chunker.push(piece):
            reply.mark("first_phrase")
            phrases.put_nowait(phrase)

    async def _speak(
        self, turn_id: int, phrases: asyncio.Queue[str | None], voice: object | None, reply: Reply
    ) -> None:
        tts = self.engines.tts
        while (phrase := await phrases.get()) is not None:
            make = functools.partial(_tts_stream, tts, phrase, voice)
            try:
                async for chunk in self.engines.tts_worker.stream(make):
                    if not reply.samples:
                        self.send(p.ReplyAudioStart(turn_id, tts.sample_rate))
                        self.set_state("speaking")
                    self._out.put_nowait((turn_id, chunk.astype("<i2").tobytes()))
                    reply.add_audio(len(chunk))
                    self.playback_end = reply.playback_end()
            except Exception as exc:
                raise StageError("tts", exc) from exc
            reply.end_phrase(phrase)


def _llm_slice(llm, prompt, so_far, size, temperature, cancel):  # runs on the LLM worker thread
    return llm.stream_slice(prompt, so_far, max_new=size, temperature=temperature, cancel=cancel)


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
