"""The Wyoming server (app/web/wyoming/) driven by the `wyoming` package's own AsyncTcpClient, replaying Home
Assistant's sequences (homeassistant/components/wyoming: stt.py, tts.py, conversation.py, data.py's describe with
its 1 s timeout) against the live app on the cpu preset; the audio it speaks is heard back by Whisper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest
from litestar.datastructures import State
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.handle import Handled
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from app.audio import ASR_RATE, float_to_int16
from app.config import Settings, load_settings
from app.core.metrics import Metrics
from app.engines.loaded import Engines
from app.web.access import AccessSettings
from app.web.wyoming.chats import Chats
from app.web.wyoming.server import WyomingServer
from app.web.wyoming.settings import WyomingSettings
from tests.support import JFK_TEXT, free_port, resample, said_so_far, word_error_rate
from tests.web.test_ws import SpyLlm, own_engines, served

VOICE = "en_US-joe-medium"
THREE = "The sun is bright today. Birds are singing in the trees. We walked along the river."
TIMEOUT = 120.0


class Wyoming(msgspec.Struct):
    port: int
    llm: SpyLlm
    tts_rate: int


@pytest.fixture(scope="module")
def wyoming(cpu_settings: Settings, engines: Engines, steady_voice) -> Iterator[Wyoming]:
    """The app with a Wyoming port, on the preset's models (the voice without sampling noise, the language model
    recording what each reply read)."""
    port = free_port()
    settings = msgspec.structs.replace(cpu_settings, wyoming=WyomingSettings(port=port))
    llm = SpyLlm(engines.llm)
    with served(own_engines(engines, llm=llm, tts=steady_voice), settings):
        yield Wyoming(port, llm, steady_voice.sample_rate)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


async def until(client: AsyncTcpClient, *types: str) -> list[Event]:
    """Every event up to and including the first of one of `types`."""
    events: list[Event] = []
    while not events or events[-1].type not in types:
        event = await client.read_event()
        assert event is not None, f"disconnected after {[e.type for e in events]}"
        events.append(event)
    return events


def pcm_of(events: list[Event]) -> np.ndarray:
    return np.concatenate([np.frombuffer(AudioChunk.from_event(e).audio, "<i2") for e in events
                           if e.type == "audio-chunk"]).astype(np.float32) / 32768


async def send_recording(client: AsyncTcpClient, pcm16k: np.ndarray, rate: int = ASR_RATE, language="en") -> None:
    """Home Assistant's speech-to-text: transcribe, audio-start, audio-chunk (1024 samples each), audio-stop."""
    data = float_to_int16(pcm16k).tobytes()
    await client.write_event(Transcribe(language=language).event())
    await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
    for start in range(0, len(data), 2048):
        await client.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=data[start : start + 2048]).event())
    await client.write_event(AudioStop().event())


def test_describe_lists_speech_to_text_voice_and_conversation_agent(wyoming, engines):
    async def ask() -> Info:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await client.write_event(Describe().event())
            return Info.from_event((await until(client, "info"))[-1])

    info = run(ask())
    assert info.asr[0].installed and info.asr[0].models[0].languages == ["en"]
    assert [v.name for v in info.tts[0].voices] == [VOICE] and info.tts[0].voices[0].languages == ["en_US"]
    assert info.tts[0].supports_synthesize_streaming is True
    assert info.handle[0].installed and info.handle[0].models[0].languages == ["en"]


def test_speech_to_text_as_home_assistant_sends_it(wyoming, jfk_pcm):
    async def transcribe() -> Transcript:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await send_recording(client, jfk_pcm)
            return Transcript.from_event((await until(client, "transcript"))[-1])

    transcript = run(transcribe())
    assert word_error_rate(transcript.text, JFK_TEXT) <= 0.15, transcript.text
    assert transcript.language == "en"


def test_synthesize_answers_with_one_audio_stream_heard_back_by_whisper(wyoming, engines):
    async def synthesize() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await client.write_event(Synthesize(text=THREE, voice=SynthesizeVoice(name=VOICE)).event())
            return await until(client, "audio-stop")

    events = run(synthesize())
    assert events[0].type == "audio-start" and AudioStart.from_event(events[0]).rate == wyoming.tts_rate
    assert {e.type for e in events[1:-1]} == {"audio-chunk"}
    heard = engines.asr.transcribe(resample(pcm_of(events), wyoming.tts_rate, ASR_RATE))
    assert word_error_rate(heard, THREE) <= 0.2, heard


def test_streamed_synthesis_speaks_each_sentence_as_soon_as_it_has_it(wyoming, engines):
    """Home Assistant's streaming sequence: synthesize-start, the text in pieces, the whole text again (for servers
    that do not stream), synthesize-stop. The first sentence's audio comes before the rest of the text is sent."""

    async def stream() -> tuple[list[Event], list[Event]]:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=VOICE)).event())
            first, rest = THREE.split(". ", 1)
            for word in (first + ". ").split(" "):
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            early = await until(client, "audio-chunk")  # while the rest of the text is still to come
            for word in rest.split(" "):
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            await client.write_event(Synthesize(text=THREE, voice=SynthesizeVoice(name=VOICE)).event())
            await client.write_event(SynthesizeStop().event())
            return early, await until(client, "synthesize-stopped")

    early, later = run(stream())
    events = early + later
    assert [e.type for e in early] == ["audio-start", "audio-chunk"]
    starts = [n for n, e in enumerate(events) if e.type == "audio-start"]
    stops = [n for n, e in enumerate(events) if e.type == "audio-stop"]
    assert len(starts) == len(stops) == 3 and all(a < b for a, b in zip(starts, stops))  # one stream a sentence
    assert events[-1].type == "synthesize-stopped" and stops[-1] == len(events) - 2
    heard = engines.asr.transcribe(resample(pcm_of(events), wyoming.tts_rate, ASR_RATE))
    assert word_error_rate(heard, THREE) <= 0.2, heard  # spoken once: the repeated whole text was not said again


def test_describe_is_answered_within_a_second_while_a_synthesis_runs(wyoming):
    """Home Assistant waits 1 s for `info`, also while the same server is busy speaking."""

    async def describe_while_speaking() -> tuple[float, float, bool]:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as speaking:
            await speaking.write_event(Synthesize(text=THREE * 3).event())
            await until(speaking, "audio-chunk")  # the synthesis is under way
            async with AsyncTcpClient("127.0.0.1", wyoming.port) as asking:
                t0 = time.monotonic()
                await asking.write_event(Describe().event())
                await until(asking, "info")
                other = time.monotonic() - t0
            t0 = time.monotonic()  # and on the connection that is speaking: info among its audio
            await speaking.write_event(Describe().event())
            events = await until(speaking, "info", "audio-stop")
            same = time.monotonic() - t0
            return other, same, events[-1].type == "info"

    other, same, before_the_end = run(describe_while_speaking())
    assert other < 1.0 and same < 1.0 and before_the_end, (other, same)


def test_a_conversation_id_keeps_its_own_memory(wyoming):
    async def say(text: str, conversation_id: str) -> Handled:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            context = {"conversation_id": conversation_id, "device_id": "kitchen"}
            await client.write_event(Transcript(text, context=context, language="en").event())
            return Handled.from_event((await until(client, "handled"))[-1])

    wyoming.llm.turns.clear()
    first = run(say("My name is Ada.", "01JKITCHEN"))
    second = run(say("What is my name?", "01JKITCHEN"))
    other = run(say("What is my name?", "01JBEDROOM"))
    assert first.text and second.text and other.text
    assert first.context == {"conversation_id": "01JKITCHEN"}
    assert said_so_far(wyoming.llm.turns[1]) == [
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.text},
        {"role": "user", "content": "What is my name?"}]
    assert said_so_far(wyoming.llm.turns[2]) == [{"role": "user", "content": "What is my name?"}]


def test_an_idle_conversation_is_forgotten(cpu_settings: Settings, engines: Engines):
    now = [0.0]
    settings = msgspec.structs.replace(cpu_settings, wyoming=WyomingSettings(conversation_idle_s=60.0))
    llm = SpyLlm(engines.llm, max_tokens=8)
    own = own_engines(engines, llm=llm)

    async def talk() -> int:
        chats = Chats(settings, Metrics(), clock=lambda: now[0])
        try:
            await chats.reply(own, "a", "Hello.")
            now[0] = 59.0
            await chats.reply(own, "a", "Hello again.")  # within the minute: remembered
            now[0] = 59.0 + 61.0
            await chats.reply(own, "a", "Are you there?")  # a minute past its last use: a new conversation
            return len(chats)
        finally:
            await chats.close()

    try:
        assert run(talk()) == 1
    finally:
        own.close()
    assert len(said_so_far(llm.turns[1])) == 3 and said_so_far(llm.turns[2]) == [
        {"role": "user", "content": "Are you there?"}]


def test_bad_requests_get_an_error_and_the_connection_goes_on(wyoming, jfk_pcm):
    async def mistakes() -> tuple[list[Event], Transcript]:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            errors = []
            await send_recording(client, resample(jfk_pcm[: ASR_RATE], ASR_RATE, 44_100), rate=44_100)
            errors += await until(client, "error")
            await client.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="bob")).event())
            errors += await until(client, "error")
            await client.write_event(Synthesize(text="   ").event())
            errors += await until(client, "error")
            await send_recording(client, jfk_pcm)  # the same connection, right after
            return errors, Transcript.from_event((await until(client, "transcript"))[-1])

    errors, transcript = run(mistakes())
    codes = [e.data["code"] for e in errors]
    assert codes == ["unsupported_audio_format", "voice_not_found", "empty_text"]
    assert "16000 Hz" in errors[0].data["text"] and "44100 Hz" in errors[0].data["text"]
    assert word_error_rate(transcript.text, JFK_TEXT) <= 0.15


def test_bytes_that_are_not_wyoming_end_that_connection_only(wyoming):
    async def garbage_then_describe() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", wyoming.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert await reader.read() == b""  # closed
        writer.close()
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await client.write_event(Describe().event())
            return (await until(client, "info"))[-1].type

    assert run(garbage_then_describe()) == "info"


def test_beyond_loopback_only_this_computer_and_allowed_peers_get_in(cpu_settings: Settings):
    def server(host: str, peers: str = "", trust_loopback: bool = True) -> WyomingServer:
        settings = msgspec.structs.replace(cpu_settings, host=host, wyoming=WyomingSettings(allowed_peers=peers),
                                           access=AccessSettings(trust_loopback=trust_loopback))
        return WyomingServer(State({"settings": settings, "metrics": Metrics()}))

    assert server("127.0.0.1").allowed("127.0.0.1")
    lan = server("0.0.0.0", "192.168.1.20, 10.0.0.0/24")
    assert lan.allowed("127.0.0.1") and lan.allowed("::ffff:127.0.0.1")
    assert lan.allowed("192.168.1.20") and lan.allowed("10.0.0.77")
    assert not lan.allowed("192.168.1.21") and not lan.allowed("8.8.8.8")
    assert not server("0.0.0.0").allowed("192.168.1.20")
    assert not server("0.0.0.0", trust_loopback=False).allowed("127.0.0.1")
    with pytest.raises(ValueError, match="not an IP address"):
        WyomingSettings(allowed_peers="homeassistant.local")
    # As the README gives it: from the environment.
    environ = {"VA_WYOMING__ALLOWED_PEERS": "192.168.1.20,10.0.0.0/24", "VA_WYOMING__PORT": "10300"}
    assert load_settings("cpu", environ=environ).wyoming.allowed_peers == ("192.168.1.20", "10.0.0.0/24")


def test_a_reply_whose_asker_went_away_is_not_taken_for_the_next_ones(wyoming):
    async def ask_and_leave(text: str, conversation_id: str) -> None:
        """Gone once the reply is being written: its events still come, into the conversation's outbox."""
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await client.write_event(Transcript(text, context={"conversation_id": conversation_id}).event())
            while not wyoming.llm.turns:
                await asyncio.sleep(0.01)

    async def say(text: str, conversation_id: str) -> str:
        async with AsyncTcpClient("127.0.0.1", wyoming.port) as client:
            await client.write_event(Transcript(text, context={"conversation_id": conversation_id}).event())
            return Handled.from_event((await until(client, "handled"))[-1]).text

    async def talk() -> tuple[str, str]:
        await ask_and_leave("Tell me a story about a brave little dragon.", "01JHALL")
        answer = await say("What is the capital of France?", "01JHALL")
        return answer, await say("Thank you.", "01JHALL")

    wyoming.llm.turns.clear()
    answer, _ = run(talk())
    last = said_so_far(wyoming.llm.turns[-1])
    asked = last.index({"role": "user", "content": "What is the capital of France?"})
    assert last[asked + 1] == {"role": "assistant", "content": answer}  # the reply it got was the one to its words
