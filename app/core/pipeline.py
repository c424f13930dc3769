"""One reply, made and spoken: LLM slices -> phrase chunker -> TTS, streamed, as one cancellable unit.

The turn queue (app/core/answering.py) runs it for a turn and cancels its task to stop it.
The voice starts on the first phrase while the LLM is still writing; text and audio leave through
the callbacks the moment they exist, and `reply` keeps the account of what was written and sent.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import msgspec
import numpy as np

from app.core.chunking import ChunkSettings, PhraseChunker
from app.core.reply import Reply
from app.engines.llm import ChatModel, Message, Prompt
from app.engines.llm_remote import ChatRequest, RemoteChatModel
from app.engines.loaded import Engines
from app.engines.tools import CallDelta, ToolReader, ToolSet
from app.engines.workers import Worker

# Room for a function call where the client sets no length: its JSON (names, quotes, spaces the grammar allows)
# takes more tokens than a spoken sentence, and a call cut short cannot be used (SmolLM2-135M forced to call
# get_weather(city, unit) ran past 32 tokens).
CALL_TOKENS = 256


class StageError(Exception):
    """A model stage failed; `stage` (asr, llm, tts) names it for the error event."""

    def __init__(self, stage: str, exc: Exception) -> None:
        super().__init__(str(exc))
        self.stage = stage


class Writing(msgspec.Struct, frozen=True):
    """What the LLM is asked for beyond the messages: a ReplyRequest's tools and length, the temperature."""

    temperature: float | None = None
    tools: ToolSet | None = None
    max_tokens: int | None = None


async def make_reply(
    engines: Engines,
    messages: list[Message],
    reply: Reply,
    *,
    chunking: ChunkSettings,
    writing: Writing,
    voice: object | None,
    on_text: Callable[[str], None],
    on_audio: Callable[[np.ndarray, bool], None] | None,
    on_call: Callable[[CallDelta], None] = lambda call: None,
    confirmed: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Write and speak the reply to `messages`. on_text gets each piece of text, on_call each piece of a
    function call (never spoken); on_audio each int16 chunk of voice and whether it is the reply's first
    (None: a text-only reply, no voice work). A reply to a turn that is not yet certain
    (app/core/answering.py) speaks its first phrase, then awaits `confirmed()` before the next.
    Raises StageError."""
    phrases: asyncio.Queue[str | None] = asyncio.Queue()
    chunker = PhraseChunker(chunking)
    writer = asyncio.create_task(_write(engines, messages, writing, chunker, phrases, reply, on_text, on_call))
    try:
        if on_audio is None:
            while (phrase := await phrases.get()) is not None:
                reply.end_phrase(phrase)
        else:
            await _speak(engines, phrases, voice, reply, on_audio, confirmed)
        await writer  # raises what the LLM raised
    finally:
        writer.cancel()


async def _write(
    engines: Engines,
    messages: list[Message],
    writing: Writing,
    chunker: PhraseChunker,
    phrases: asyncio.Queue[str | None],
    reply: Reply,
    on_text: Callable[[str], None],
    on_call: Callable[[CallDelta], None],
) -> None:
    llm = engines.llm
    try:
        prompt = await engines.llm_worker.run(llm.prompt, messages, writing.tools)
        reply.input_tokens = prompt_tokens(llm, prompt, messages)
        async for piece in write_reply(llm, engines.llm_worker, prompt, writing.temperature, writing.max_tokens):
            reply.mark("first_token")
            if isinstance(piece, CallDelta):
                reply.calls += piece.arguments
                on_call(piece)
                continue
            reply.text += piece
            on_text(piece)
            for phrase in chunker.push(piece):
                reply.mark("first_phrase")
                phrases.put_nowait(phrase)
        for phrase in chunker.flush():
            reply.mark("first_phrase")
            phrases.put_nowait(phrase)
        reply.output_tokens = llm.count_tokens(reply.text + reply.calls) if reply.text or reply.calls else 0
    except Exception as exc:
        raise StageError("llm", exc) from exc
    finally:
        phrases.put_nowait(None)


def prompt_tokens(llm: ChatModel | RemoteChatModel, prompt: Prompt | ChatRequest, messages: list[Message]) -> int:
    """The prompt's length in the model's tokens: exact in process; estimated for a server, which applies
    the template itself (the same estimate that trims the history for it)."""
    tokens = getattr(prompt, "tokens", None)
    return len(tokens) if tokens is not None else llm.count_messages(messages)


async def write_reply(
    llm: ChatModel | RemoteChatModel,
    worker: Worker,
    prompt: Prompt | ChatRequest,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> AsyncIterator[str | CallDelta]:
    """The reply to `prompt`, piece by piece as the model writes it: speakable text (str) and the pieces
    of the calls it makes (CallDelta), in at most `max_tokens` tokens (None: the settings' max_tokens).

    A model on a server (RemoteChatModel) streams it itself: its server schedules the replies of
    every session at once, and reading the stream is network I/O that suits the event loop, so it
    needs no worker. In-process, one worker job per slice of `slice_tokens` tokens, so that other
    sessions' jobs interleave with a long reply's; its raw text goes through a ToolReader. A forced
    call (a grammar) is one job: llama.cpp cannot resume a grammar in a later slice (ChatModel.stream_slice).
    Raises ValueError if the model wrote a malformed call.
    """
    budget = llm.settings.max_tokens if max_tokens is None else max_tokens
    if max_tokens is None and prompt.tools is not None:
        budget = max(budget, CALL_TOKENS)
    own = getattr(llm, "write", None)
    if own is not None:
        if budget != prompt.max_tokens:
            prompt = msgspec.structs.replace(prompt, max_tokens=budget)
        async for piece in own(prompt, temperature):
            yield piece
        return
    async for piece in _write_in_process(llm, worker, prompt, temperature, budget):
        yield piece


async def _write_in_process(
    llm: ChatModel, worker: Worker, prompt: Prompt, temperature: float | None, budget: int
) -> AsyncIterator[str | CallDelta]:
    reader = ToolReader(prompt.tools)
    slice_tokens = budget if prompt.grammar is not None else llm.settings.slice_tokens
    text, used, finished = "", 0, False
    while not finished and used < budget:
        size = min(slice_tokens, budget - used)
        make = functools.partial(_slice_job, llm, prompt, text, size, temperature)
        got = 0
        async for piece, stop in worker.stream(make):
            got, finished = got + 1, finished or stop
            if piece:
                text += piece
                for out in reader.feed(piece):
                    yield out
        used += got
        finished = finished or got < size  # a stop string or a full context ends it too
    for out in reader.finish():
        yield out


def _slice_job(llm, prompt, so_far, size, temperature, cancel):  # runs on the LLM worker thread
    return llm.stream_slice(prompt, so_far, max_new=size, temperature=temperature, cancel=cancel)


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
        make = functools.partial(tts_job, engines.tts, phrase, voice)
        try:
            async for chunk in engines.tts_worker.stream(make):
                first = not reply.samples
                reply.add_audio(len(chunk))
                on_audio(chunk, first)
        except Exception as exc:
            raise StageError("tts", exc) from exc
        reply.end_phrase(phrase)


def tts_job(tts, phrase: str, voice: object | None, cancel) -> Iterator[np.ndarray]:  # on the TTS worker thread
    """One phrase's voice, as a worker job (Worker.stream passes `cancel`); app/core/speech.py's too."""
    return tts.synthesize(phrase, voice=voice, cancel=cancel)
