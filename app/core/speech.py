"""Speech outside a conversation: text to voice, phrase by phrase, and a recording to timed text.

The wire adapters that are not a conversation (OpenAI's audio REST endpoints, Home Assistant's Wyoming
server) use these: the text is cut into phrases as a reply is (app/core/chunking.py), and each phrase's
voice leaves as soon as the voice engine makes it; the models run on their engines' worker threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator

import msgspec
import numpy as np

from app.core.chunking import ChunkSettings, PhraseChunker
from app.core.pipeline import tts_job
from app.engines.asr import Segment
from app.engines.loaded import Engines


class Spoken(msgspec.Struct, frozen=True):
    """A piece of one phrase's voice (mono int16 at the engine's rate), or its end (`pcm` None)."""

    phrase: str
    pcm: np.ndarray | None = None


class SpeechStream:
    """Text that comes in pieces (push, then end) becomes phrases; spoken() yields each phrase's voice as it is
    made, phrase after phrase, while more text may still come. One engine job per phrase, so other sessions'
    phrases take turns with these."""

    def __init__(self, engines: Engines, chunking: ChunkSettings | None = None, voice: object | None = None) -> None:
        self.engines = engines
        self._voice = voice
        self._chunker = PhraseChunker(chunking)
        self._phrases: asyncio.Queue[str | None] = asyncio.Queue()
        self.text = ""  # every piece pushed so far

    def push(self, text: str) -> None:
        self.text += text
        for phrase in self._chunker.push(text):
            self._phrases.put_nowait(phrase)

    def end(self) -> None:
        for phrase in self._chunker.flush():
            self._phrases.put_nowait(phrase)
        self._phrases.put_nowait(None)

    async def spoken(self) -> AsyncIterator[Spoken]:
        while (phrase := await self._phrases.get()) is not None:
            make = functools.partial(tts_job, self.engines.tts, phrase, self._voice)
            async for chunk in self.engines.tts_worker.stream(make):
                if len(chunk):
                    yield Spoken(phrase, chunk)
            yield Spoken(phrase)


async def speak(engines: Engines, text: str, chunking: ChunkSettings | None = None) -> AsyncIterator[Spoken]:
    """All of `text`, spoken phrase by phrase."""
    stream = SpeechStream(engines, chunking)
    stream.push(text)
    stream.end()
    async for piece in stream.spoken():
        yield piece


async def transcribe(engines: Engines, audio: np.ndarray) -> str:
    """The text of one utterance (16 kHz mono float32), as a conversation's turn is transcribed."""
    return await engines.asr_worker.run(engines.asr.transcribe, audio)


async def timed_transcript(engines: Engines, audio: np.ndarray, *, language: str | None = None,
                           prompt: str | None = None) -> AsyncIterator[Segment]:
    """A recording of any length as timed segments, each as soon as the model has it."""
    make = functools.partial(_segments_job, engines.asr, audio, language, prompt)
    async for segment in engines.asr_worker.stream(make):
        yield segment


def _segments_job(asr, audio, language, prompt, cancel) -> Iterator[Segment]:  # on the ASR worker thread
    return asr.segments(audio, language=language, prompt=prompt)
