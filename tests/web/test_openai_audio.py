"""OpenAI's audio REST endpoints (app/web/openai_audio/) driven by the official `openai` SDK against the live server
on the cpu preset: speech in every format and as SSE, heard back by Whisper; transcriptions in every format and
streamed; voices and models; refused requests in OpenAI's error shape, after which the server goes on; pairing."""

from __future__ import annotations

import base64
import io
import json
import ssl
from collections.abc import Iterator

import av
import httpx
import msgspec
import numpy as np
import openai
import pytest
from openai import OpenAI

from app.audio import ASR_RATE
from app.config import Settings
from app.engines.loaded import Engines
from app.web.server import create_app
from tests.support import DATA, JFK_TEXT, resample, serving, word_error_rate
from tests.web.test_ws import own_engines, served

SENTENCE = "The quick brown fox jumps over the lazy dog. It was a sunny day."
MAGIC = {"mp3": (b"ID3", b"\xff\xf3", b"\xff\xfb", b"\xff\xf2"), "opus": (b"OggS",), "aac": (b"\xff\xf1", b"\xff\xf9"),
         "flac": (b"fLaC",), "wav": (b"RIFF",)}


@pytest.fixture(scope="module")
def server(cpu_settings: Settings, engines: Engines, steady_voice) -> Iterator[str]:
    """The live app with the preset's models; its voice without sampling noise, so that what Whisper hears back of
    a sentence does not change from run to run."""
    with served(own_engines(engines, llm=engines.llm, tts=steady_voice), cpu_settings) as url:
        yield url


@pytest.fixture
def client(server: str) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="local", max_retries=0, timeout=120)


def decoded(data: bytes, response_format: str) -> tuple[np.ndarray, int]:
    """Audio of any of the formats -> mono float32, and the rate it came at."""
    if response_format == "pcm":  # raw 16-bit little-endian mono at 24 kHz, as OpenAI sends it
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24_000
    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].sample_rate
        to_float = av.AudioResampler(format="flt", layout="mono", rate=rate)
        frames = [out.to_ndarray().reshape(-1) for f in container.decode(audio=0) for out in to_float.resample(f)]
    return np.concatenate(frames), rate


def heard(engines: Engines, audio: np.ndarray, rate: int) -> str:
    return engines.asr.transcribe(resample(audio, rate, ASR_RATE))


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_in_every_format_is_heard_back_by_whisper(client, engines, response_format):
    response = client.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=SENTENCE,
                                                             response_format=response_format)
    data = response.content
    if response_format != "pcm":
        assert data.startswith(MAGIC[response_format]), data[:8]
    audio, rate = decoded(data, response_format)
    assert rate == (48_000 if response_format == "opus" else 24_000)  # an Opus decoder always gives 48 kHz
    assert 3.0 < len(audio) / rate < 8.0  # two short sentences
    said = heard(engines, audio, rate)
    assert word_error_rate(said, SENTENCE) <= 0.2, said


def test_speech_is_mp3_unless_asked_otherwise(client):
    response = client.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Hello there.")
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.content[:3] == b"ID3" or response.content[:2] in MAGIC["mp3"]


def test_speech_streamed_as_sse_events_carries_the_whole_voice(client, engines):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="default", input=SENTENCE, response_format="pcm", stream_format="sse"
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) > 1 and all(e["type"] == "speech.audio.delta" for e in deltas)  # streamed: many pieces
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"]
    audio, rate = decoded(b"".join(base64.b64decode(e["audio"]) for e in deltas), "pcm")
    assert word_error_rate(heard(engines, audio, rate), SENTENCE) <= 0.2


def test_speed_changes_the_length_not_the_words(client, engines):
    lengths = {}
    for speed in (1.0, 2.0):
        data = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="wav",
                                          speed=speed).content
        audio, rate = decoded(data, "wav")
        lengths[speed] = len(audio) / rate
    # The steady voice says it the same length each time; atempo keeps that length to a few ms at double speed.
    assert lengths[2.0] / lengths[1.0] == pytest.approx(0.5, abs=0.03)
    assert word_error_rate(heard(engines, audio, rate), SENTENCE) <= 0.25


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "verbose_json", "vtt"])
def test_transcriptions_in_every_format(client, response_format):
    with open(DATA / "jfk.flac", "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f, response_format=response_format)
    if response_format == "json":
        text = result.text
    elif response_format == "verbose_json":
        text = result.text
        assert result.duration == pytest.approx(11.0, abs=0.05) and result.language == "en"
        starts = [s.start for s in result.segments]
        assert starts == sorted(starts) and result.segments[-1].end <= result.duration
        assert " ".join(s.text.strip() for s in result.segments) == result.text
    elif response_format == "text":
        text = result
    else:
        blocks = [b.splitlines() for b in result.strip().split("\n\n")]
        if response_format == "vtt":
            assert blocks[0] == ["WEBVTT"]
            blocks = blocks[1:]
        else:
            assert [int(b[0]) for b in blocks] == list(range(1, len(blocks) + 1))
            blocks = [b[1:] for b in blocks]
        comma = "," if response_format == "srt" else "."
        assert all("00:00:0" in b[0] and comma in b[0] and " --> " in b[0] for b in blocks)
        text = " ".join(b[1] for b in blocks)
    assert word_error_rate(text, JFK_TEXT) <= 0.15, text


def test_a_streamed_transcription_sends_deltas_then_the_whole_text(client):
    with open(DATA / "jfk.flac", "rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    deltas, done = events[:-1], events[-1]
    assert deltas and all(e.type == "transcript.text.delta" for e in deltas)
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in deltas) == done.text
    assert word_error_rate(done.text, JFK_TEXT) <= 0.15


def test_speech_made_here_is_transcribed_here(client):
    """The two endpoints together, as Open WebUI uses them: what one says, the other hears."""
    mp3 = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE).content
    text = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", mp3), language="en").text
    assert word_error_rate(text, SENTENCE) <= 0.2


def test_voices_and_models_are_listed_as_open_webui_reads_them(server):
    voices = httpx.get(f"{server}/v1/audio/voices").json()["voices"]
    assert voices[0] == {"id": "en_US-joe-medium", "name": "en_US-joe-medium"}
    models = httpx.get(f"{server}/v1/audio/models").json()
    assert [m["id"] for m in models["models"]] == ["tts-1", "whisper-1"]
    assert [m["id"] for m in models["data"]] == ["tts-1", "whisper-1"]


def refused(call) -> dict:
    """The error body of a call the SDK raises on (a 4xx)."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    assert caught.value.status_code == 400
    return caught.value.body


def test_bad_requests_are_told_what_to_change_and_the_server_goes_on(client):
    speech = client.audio.speech.create
    cases = {
        "voice_not_found": lambda: speech(model="tts-1", voice="bob", input="Hello."),
        "empty_input": lambda: speech(model="tts-1", voice="alloy", input="   "),
        "too_long": lambda: speech(model="tts-1", voice="alloy", input="word " * 1000),
        "invalid_file_format": lambda: client.audio.transcriptions.create(
            model="whisper-1", file=("notes.wav", b"these are not the bytes of a sound " * 50)),
        "unsupported_language": lambda: client.audio.transcriptions.create(
            model="whisper-1", file=open(DATA / "jfk.flac", "rb"), language="fr"),
    }
    for code, call in cases.items():
        body = refused(call)
        assert body["code"] == code and body["type"] == "invalid_request_error", body
        assert body["message"] and "Traceback" not in body["message"]
    wrong = refused(lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.",
                                                       response_format="ogg"))
    assert wrong["param"] == "response_format"
    nameless = refused(lambda: client.audio.transcriptions.create(model="whisper-1", file=("audio", b"\0" * 100)))
    assert nameless["code"] == "invalid_file_format"
    # And it goes on.
    assert client.audio.speech.create(model="tts-1", voice="alloy", input="Still here.").content


def test_uploads_past_the_limits_are_refused(cpu_settings: Settings, engines: Engines):
    limits = msgspec.structs.replace(cpu_settings.limits, max_upload_bytes=400_000, max_upload_s=5.0)
    settings = msgspec.structs.replace(cpu_settings, limits=limits)
    with serving(create_app(settings, engines)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0)
        with pytest.raises(openai.APIStatusError) as too_big:
            client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * 500_000))
        assert too_big.value.status_code == 413 and "max_upload_bytes" in too_big.value.body["message"]
        jfk = (DATA / "jfk.flac").read_bytes()  # 11 s in 200 KB
        body = refused(lambda: client.audio.transcriptions.create(model="whisper-1", file=("jfk.flac", jfk)))
        assert body["code"] == "audio_too_long"


def test_with_pairing_a_program_needs_the_token_as_its_api_key(paired_server):
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(paired_server.cert)))
    stranger = OpenAI(base_url=f"{paired_server.url}/v1", api_key="wrong", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
    assert caught.value.body["type"] == "authentication_error" and "token" in caught.value.body["message"]
    assert http.get(f"{paired_server.url}/v1/audio/voices").status_code == 401
    paired = OpenAI(base_url=f"{paired_server.url}/v1", api_key=paired_server.token, http_client=http, max_retries=0)
    assert paired.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="wav").content


def test_a_page_of_another_origin_is_refused(server):
    response = httpx.post(f"{server}/v1/audio/transcriptions", headers={"Origin": "https://evil.example"},
                          files={"file": ("a.wav", b"RIFF")})
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
