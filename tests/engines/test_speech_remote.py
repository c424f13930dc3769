"""asr.backend openai and tts.engine openai: speech-to-text and the voice on another instance of this server (its
OpenAI audio endpoints), as N assistant servers would share one speech pool. The front server loads only its
language model; what it hears and says goes through the pool's real models."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from openai import OpenAI

from app.audio import ASR_RATE
from app.config import Settings, load_settings
from app.engines.loaded import Engines
from app.engines.speech_remote import RemoteTranscriber, RemoteVoice, SpeechServerError
from app.startup import load_and_warm
from app.web.server import create_app
from tests.support import DATA, JFK_TEXT, free_port, resample, serving, word_error_rate

SENTENCE = "The quick brown fox jumps over the lazy dog."


def front_settings(cpu_settings: Settings, pool_url: str) -> Settings:
    environ = {"VA_ASR__BACKEND": "openai", "VA_ASR__BASE_URL": f"{pool_url}/v1", "VA_ASR__MODEL": "whisper-1",
               "VA_TTS__ENGINE": "openai", "VA_TTS__OPENAI__BASE_URL": f"{pool_url}/v1"}
    return load_settings("cpu", environ=environ)  # as the README's settings are given: the environment


@pytest.fixture(scope="module")
def front(cpu_settings: Settings, live_server: str) -> Iterator[Engines]:
    loaded = load_and_warm(front_settings(cpu_settings, live_server))
    yield loaded
    loaded.close()


def test_the_front_server_loads_no_speech_model_of_its_own(front):
    assert isinstance(front.asr, RemoteTranscriber) and isinstance(front.tts, RemoteVoice)
    assert front.tts.sample_rate == 24_000


def test_speech_is_transcribed_by_the_pool(front, jfk_pcm):
    assert word_error_rate(front.asr.transcribe(jfk_pcm), JFK_TEXT) <= 0.15
    segments = list(front.asr.segments(jfk_pcm))
    assert segments and segments[-1].end <= 11.05 and segments[0].language == "en"


def test_the_pools_voice_streams_in_pieces_and_says_the_words(front, engines):
    pieces = list(front.tts.synthesize(SENTENCE))
    assert len(pieces) > 5 and all(p.dtype == np.int16 for p in pieces)
    audio = np.concatenate(pieces).astype(np.float32) / 32768
    heard = engines.asr.transcribe(resample(audio, 24_000, ASR_RATE))  # the test's own Whisper
    assert word_error_rate(heard, SENTENCE) <= 0.25, heard


def test_a_front_server_answers_its_clients_through_the_pool(cpu_settings, live_server, front, engines):
    with serving(create_app(front_settings(cpu_settings, live_server), front)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=120)
        with open(DATA / "jfk.flac", "rb") as f:
            text = client.audio.transcriptions.create(model="whisper-1", file=f).text
        pcm = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm").content
    assert word_error_rate(text, JFK_TEXT) <= 0.15
    heard = engines.asr.transcribe(resample(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, 24_000, ASR_RATE))
    assert word_error_rate(heard, SENTENCE) <= 0.25, heard


def test_a_pool_that_is_down_is_one_clear_line(cpu_settings):
    settings = front_settings(cpu_settings, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SpeechServerError) as failed:
        RemoteTranscriber.load(settings.asr).warm_up()
    assert str(failed.value).startswith("the speech-to-text server http://127.0.0.1:")
    assert "could not be reached: start it, or check asr.base_url (VA_ASR__BASE_URL)" in str(failed.value)


def test_backend_openai_needs_an_address():
    with pytest.raises(Exception, match="asr base_url"):
        load_settings("cpu", environ={"VA_ASR__BACKEND": "openai"})
    with pytest.raises(Exception, match="tts openai.base_url"):
        load_settings("cpu", environ={"VA_TTS__ENGINE": "openai"})
    hidden = load_settings("cpu", environ={"VA_ASR__BACKEND": "openai", "VA_ASR__BASE_URL": "http://x/v1",
                                            "VA_ASR__API_KEY": "secret-token"})
    assert "secret-token" not in repr(hidden.asr)
