"""faster-whisper tiny.en on real speech."""

import numpy as np

from app.asr import Transcriber
from tests.conftest import JFK_TEXT, words


def test_tiny_en_transcribes_jfk(engines, jfk_pcm):
    text = engines.asr.transcribe(jfk_pcm)
    assert words(text) == words(JFK_TEXT)


def test_silence_and_noise_give_no_text(engines):
    assert engines.asr.transcribe(np.zeros(16_000, np.float32)) == ""
    assert engines.asr.transcribe(np.zeros(0, np.float32)) == ""
    noise = np.random.default_rng(0).normal(0, 0.05, 32_000).astype(np.float32)
    assert engines.asr.transcribe(noise) == ""


def test_engine_is_a_transcriber(engines):
    assert isinstance(engines.asr, Transcriber)
