"""One reply, made and spoken: LLM slices -> phrase chunker -> TTS, streamed, as one cancellable unit.

The conversation core (app/core/conversation.py) runs it for a turn and cancels its task to stop it.
The voice starts on the first phrase while the LLM is still writing; text and audio leave through
the callbacks the moment they exist, and `reply` keeps the account of what was written and sent.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import numpy as np

from app.core.chunking import PhraseChunker
from app.engines.loaded import Engines
from app.engines.llm import Message, write_reply
from app.core.reply import Reply


class StageError(Exception):
    """A model stage failed; `stage` (asr, llm, tts) names it for the error event."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(str(exc))
        self.stage = stage


async def make_reply(
    engines: Engines,
    messages: list[Message],
    reply: Reply,
    *,
    temperature: float | None,
    voice: object | None,
    on_text: Callable[[str], None],
    on_audio: Callable[[np.ndarray, bool], None],
    confirmed: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Write and speak the reply to `messages`. on_text gets each piece of text; on_audio each
    int16 chunk of voice and whether it is the reply's first. A reply to a turn that is not yet
    certain (app/core/answering.py) speaks its first phrase, then awaits `confirmed()` before the next.
    Raises StageError."""
    phrases: asyncio.Queue[str | None] = asyncio.Queue()
    writer = asyncio.create_task(_write(engines, messages, temperature, phrases, reply, on_text))
    try:
        await _speak(engines, phrases, voice, reply, on_audio, confirmed)
        await writer  # raises what the LLM raised
    finally:
        writer.cancel()


async def _write(
    engines: Engines,
    messages: list[Message],
    temperature: float | None,
    phrases: asyncio.Queue[str | None],
    reply: Reply,
    on_text: Callable[[str], None],
) -> None:
    chunker = PhraseChunker(engines.settings.chunking)
    try:
        prompt = await engines.llm_worker.run(engines.llm.prompt, messages)
        async for piece in write_reply(engines.llm, engines.llm_worker, prompt, temperature):
            reply.mark("first_token")
            reply.text += piece
            on_text(piece)
            for phrase in chunker.push(piece):
                reply.mark("first_phrase")
                phrases.put_nowait(phrase)
        for phrase in chunker.flush():
            reply.mark("first_phrase")
            phrases.put_nowait(phrase)
    except Exception as exc:
        raise StageError("llm", exc) from exc
    finally:
        phrases.put_nowait(None)


async def _speak(
    engines: Engines,
    phrases: asyncio.Queue[str | None],
    voice: object | None,
    reply: Reply,
    on_audio: Callable[[np.ndarray, bool], None],
    confirmed: Callable[[], Awaitable[bool]] | None,
) -> None:
    while (phrase := await phrases.get()) is not None:
        if reply.phrases and confirmed is not None and not await confirmed():
            raise asyncio.CancelledError  # the guess was wrong (its task is being cancelled too)
        make = functools.partial(_tts_job, engines.tts, phrase, voice)
        try:
            async for chunk in engines.tts_worker.stream(make):
                first = not reply.samples
                reply.add_audio(len(chunk))
                on_audio(chunk, first)
        except Exception as exc:
            raise StageError("tts", exc) from exc
        reply.end_phrase(phrase)


def _tts_job(tts, phrase, voice, cancel):  # runs on the TTS worker thread
    return tts.synthesize(phrase, voice=voice, cancel=cancel)
