"""Piper's network cut in two: the decoder run a chunk at a time must give the samples it gives whole."""

import os

import numpy as np
import onnxruntime
import pytest
from faster_whisper.utils import get_assets_path

from app.engines import models
from app.engines.tts.piper import PiperSettings
from app.engines.tts.piper_split import chunks, decode, split


@pytest.fixture(scope="module")
def parts():
    parts = split(models.resolve(PiperSettings().model, "tts"))
    assert parts is not None
    return parts


def _session(model: bytes) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_chunked_decoding_matches_the_whole(parts, engines):
    front, decoder = _session(parts.front), _session(parts.decoder)
    (ids,) = engines.tts.phoneme_ids("Please open the window.")
    latent = front.run(None, engines.tts.front_inputs(ids))[0]
    frames = latent.shape[2]
    assert frames > 40  # long enough for several chunks
    whole = decoder.run(None, {parts.latent: latent})[0].reshape(-1)
    assert len(whole) == frames * parts.hop
    pieces = list(decode(lambda feeds: decoder.run(None, feeds)[0], parts, latent, first=8, most=16))
    assert len(pieces) > 3
    chunked = np.concatenate(pieces)
    assert chunked.shape == whole.shape
    assert np.abs(chunked - whole).max() < 1e-4
    # With too little context the seams would show: the bound is what makes them exact.
    short = parts._replace(context=2)
    rough = np.concatenate(list(decode(lambda feeds: decoder.run(None, feeds)[0], short, latent, first=8, most=16)))
    assert np.abs(rough - whole).max() > 1e-3


def test_hop_and_context_come_from_the_decoder(parts):
    assert parts.hop == 256  # joe medium: 22050 Hz, upsampled 8 x 8 x 4
    assert 8 <= parts.context <= 20


def test_chunks_start_small_and_double():
    assert list(chunks(100, first=10, most=40)) == [(0, 10), (10, 30), (30, 70), (70, 100)]
    assert list(chunks(5, first=10, most=40)) == [(0, 5)]
    assert list(chunks(0, first=10, most=40)) == []


def test_a_network_that_is_not_vits_is_not_cut():
    silero = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    assert split(silero) is None


def test_streamed_and_whole_voices_agree_in_length_and_level(engines):
    from app.engines.tts.piper import PiperEngine

    streamed = engines.tts
    assert streamed._parts is not None  # the cpu preset streams
    whole = PiperEngine.load(PiperSettings(stream=False))
    text = "The sky is blue because of a process called Rayleigh scattering."
    a = np.concatenate(list(streamed.synthesize(text))).astype(np.float32) / 32767
    b = np.concatenate(list(whole.synthesize(text))).astype(np.float32) / 32767
    assert abs(len(a) - len(b)) / len(b) < 0.15  # the same words at the same pace (durations are sampled)
    assert 0.4 < np.abs(a).max() <= 1.0  # one gain for every phrase: loud, not clipped flat
    assert np.mean(np.abs(a) >= 0.999) < 0.001
