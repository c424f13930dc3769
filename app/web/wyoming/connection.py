"""One Wyoming connection (Home Assistant opens one per request): its events in, the answers out.

`describe` is answered at once, whatever else runs; the slow work (a transcription, a synthesis, a reply) runs as
jobs, one after another, off the reading loop, so a connection never stops reading. A streamed synthesis
(synthesize-start, -chunk..., -stop) takes its text while it speaks: each sentence's audio goes out as soon as the
voice makes it (audio-start, audio-chunk..., audio-stop per sentence), then synthesize-stopped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from app.config import Settings
from app.core.speech import SpeechStream, speak, transcribe
from app.engines.loaded import Engines
from app.web.voices import known_voice, voice_name
from app.web.wyoming.chats import Chats, NotAnswered
from app.web.wyoming.info import server_info
from app.web.wyoming.recording import CHANNELS, WIDTH, Recording, Refusal
from app.web.wyoming.wire import read_event

log = logging.getLogger(__name__)


class Shared(Protocol):
    """What every connection reads of the server: settings, engines once loaded, the conversations."""

    settings: Settings
    chats: Chats

    def engines(self) -> Engines | None: ...


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shared: Shared) -> None:
        self.reader, self.writer, self.shared = reader, writer, shared
        self.settings = shared.settings
        self._jobs: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._recording = Recording(self.settings.limits.max_upload_s)
        self._stream: SpeechStream | None = None  # a streamed synthesis, while its text comes

    async def serve(self) -> None:
        worker = asyncio.create_task(self._work())
        try:
            max_bytes = self.settings.limits.max_frame_bytes
            while (event := await read_event(self.reader, max_bytes)) is not None:
                await self.on_event(event)
        finally:
            if self._stream is not None:
                self._stream.end()
            self._jobs.put_nowait(None)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def send(self, event: Event) -> None:
        await async_write_event(event, self.writer)

    async def refuse(self, code: str, text: str) -> None:
        log.info("wyoming: refused (%s): %s", code, text)
        await self.send(Error(text=text, code=code).event())

    async def _work(self) -> None:
        """The jobs, in the order they came; one that fails is told to the peer, and the next runs."""
        while (job := await self._jobs.get()) is not None:
            try:
                await job()
            except NotAnswered as exc:
                await self.send(NotHandled(text=str(exc)).event())
            except Exception:
                log.exception("wyoming: a request failed")
                await self.send(Error(text="The assistant could not do that; its log says why.",
                                      code="internal_error").event())

    # ------------------------------------------------------------ events

    async def on_event(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self.send(server_info(self.settings, self.shared.engines()).event())
            return
        engines = self.shared.engines()
        if engines is None:
            await self.refuse("loading", "The assistant is still starting; try again in a moment.")
            return
        for kind, handler in self._handlers():
            if kind.is_type(event.type):
                await handler(engines, event)
                return
        log.debug("wyoming: skipped an event of type %r", event.type)  # the protocol says: drop what is unknown

    def _handlers(self) -> list[tuple[type, Callable[[Engines, Event], Awaitable[None]]]]:
        return [(Transcribe, self._transcribe), (AudioStart, self._audio_start), (AudioChunk, self._audio_chunk),
                (AudioStop, self._audio_stop), (Synthesize, self._synthesize), (SynthesizeStart, self._stream_start),
                (SynthesizeChunk, self._stream_chunk), (SynthesizeStop, self._stream_stop),
                (Transcript, self._handle)]

    # ------------------------------------------------------------ speech-to-text

    async def _transcribe(self, engines: Engines, event: Event) -> None:
        self._recording.transcribe(Transcribe.from_event(event).language)

    async def _audio_start(self, engines: Engines, event: Event) -> None:
        start = AudioStart.from_event(event)
        await self._refusing(self._recording.start, start.rate, start.width, start.channels)

    async def _audio_chunk(self, engines: Engines, event: Event) -> None:
        chunk = AudioChunk.from_event(event)
        await self._refusing(self._recording.add, chunk.audio, chunk.rate, chunk.width, chunk.channels)

    async def _refusing(self, step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except Refusal as refusal:
            await self.refuse(refusal.code, refusal.text)

    async def _audio_stop(self, engines: Engines, event: Event) -> None:
        audio, language = self._recording.stop(), self._recording.language
        if audio is None:
            return

        async def job() -> None:
            text = await transcribe(engines, audio)
            await self.send(Transcript(text=text, language=language or self.settings.asr.language).event())

        self._jobs.put_nowait(job)

    # ------------------------------------------------------------ text-to-speech

    async def _synthesize(self, engines: Engines, event: Event) -> None:
        if self._stream is not None:
            return  # a streamed synthesis sends the whole text too, for servers that do not stream: already said
        wanted = Synthesize.from_event(event)
        voice = wanted.voice.name if wanted.voice else None
        if not await self._voice_ok(voice) or not await self._text_ok(wanted.text):
            return

        async def job() -> None:
            await self.send(self._audio_start_event(engines))
            async for piece in speak(engines, wanted.text, self.settings.chunking):
                if piece.pcm is not None:
                    await self.send(_chunk(piece.pcm, engines.tts.sample_rate))
            await self.send(AudioStop().event())

        self._jobs.put_nowait(job)

    async def _stream_start(self, engines: Engines, event: Event) -> None:
        wanted = SynthesizeStart.from_event(event)
        if not await self._voice_ok(wanted.voice.name if wanted.voice else None):
            return
        stream = self._stream = SpeechStream(engines, self.settings.chunking)
        self._jobs.put_nowait(lambda: self._speak_stream(engines, stream))

    async def _stream_chunk(self, engines: Engines, event: Event) -> None:
        if self._stream is None:
            return
        text = SynthesizeChunk.from_event(event).text
        if len(self._stream.text) + len(text) > self.settings.limits.max_text_chars:
            await self.refuse("too_long", f"The text is longer than {self.settings.limits.max_text_chars} characters "
                                          "(limits.max_text_chars); the rest was dropped.")
            return
        self._stream.push(text)

    async def _stream_stop(self, engines: Engines, event: Event) -> None:
        if self._stream is not None:
            self._stream.end()
            self._stream = None

    async def _speak_stream(self, engines: Engines, stream: SpeechStream) -> None:
        """Each sentence its own audio-start ... audio-stop, sent as it is made; synthesize-stopped at the end."""
        started = False
        async for piece in stream.spoken():
            if piece.pcm is None:
                await self.send(AudioStop().event())
                started = False
                continue
            if not started:
                await self.send(self._audio_start_event(engines))
                started = True
            await self.send(_chunk(piece.pcm, engines.tts.sample_rate))
        await self.send(SynthesizeStopped().event())

    def _audio_start_event(self, engines: Engines) -> Event:
        return AudioStart(rate=engines.tts.sample_rate, width=WIDTH, channels=CHANNELS).event()

    async def _voice_ok(self, name: str | None) -> bool:
        if known_voice(self.settings, name):
            return True
        await self.refuse("voice_not_found", f"There is no voice '{name}'; this server speaks with "
                                             f"'{voice_name(self.settings)}'.")
        return False

    async def _text_ok(self, text: str) -> bool:
        if not text.strip():
            await self.refuse("empty_text", "The text is empty: there is nothing to say.")
            return False
        if len(text) > self.settings.limits.max_text_chars:
            await self.refuse("too_long", f"The text is longer than {self.settings.limits.max_text_chars} characters "
                                          "(limits.max_text_chars).")
            return False
        return True

    # ------------------------------------------------------------ the conversation agent

    async def _handle(self, engines: Engines, event: Event) -> None:
        said = Transcript.from_event(event)
        context = said.context or {}
        given = context.get("conversation_id")
        key = str(given) if given else uuid.uuid4().hex  # none given: a conversation of one turn
        if not await self._text_ok(said.text):
            return

        async def job() -> None:
            text = await self.shared.chats.reply(engines, key, said.text)
            await self.send(Handled(text=text, context={"conversation_id": key} if given else None).event())

        self._jobs.put_nowait(job)


def _chunk(pcm: np.ndarray, rate: int) -> Event:
    return AudioChunk(rate=rate, width=WIDTH, channels=CHANNELS, audio=np.asarray(pcm, "<i2").tobytes()).event()
