"""The G.711 codecs of /v1/realtime's audio/pcmu and audio/pcma (app/web/realtime/g711.py): every 16-bit value
within the recommendation's error bound, the known code points, and FFmpeg's pcm_mulaw / pcm_alaw (through PyAV)
as a second, independent implementation."""

from __future__ import annotations

import av
import numpy as np
import pytest

from app.web.realtime.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

EVERY = np.arange(-32768, 32768).astype(np.int16)  # every 16-bit sample
CODES = np.arange(256, dtype=np.uint8)
CODECS = {"pcm_mulaw": (ulaw_encode, ulaw_decode), "pcm_alaw": (alaw_encode, alaw_decode)}


def test_mu_law_keeps_every_sample_within_half_a_step_of_its_segment():
    """The step of segment e is 2^(e+3) and |x| + 132 >= 128 * 2^e there: half a step is (|x| + 132) / 32 at
    most, also for the clipped ends (32767 decodes to 32124)."""
    x = EVERY.astype(np.int64)
    error = np.abs(x - ulaw_decode(ulaw_encode(EVERY)))
    assert np.all(error <= (np.abs(x) + 132) / 32)
    assert error.max() == 644  # -32768: clipped to 32635, decoded 32124


def test_a_law_keeps_every_sample_within_half_a_step_of_its_segment():
    """Steps of 16 below 512, 2^(s+3) from 128 * 2^s on: max(8, |x| / 32), one more below zero (A-law codes ~x)."""
    x = EVERY.astype(np.int64)
    error = np.abs(x - alaw_decode(alaw_encode(EVERY)))
    assert np.all(error <= np.maximum(8, np.abs(x) / 32) + 1)
    assert error[np.abs(x) < 512].max() <= 9


def test_silence_and_the_extremes_have_their_known_codes():
    assert ulaw_encode(np.array([0]))[0] == 0xFF and alaw_encode(np.array([0]))[0] == 0xD5
    assert ulaw_decode(np.array([0xFF, 0x7F, 0x80, 0x00], np.uint8)).tolist() == [0, 0, 32124, -32124]
    assert alaw_decode(np.array([0xD5, 0x55, 0xAA, 0x2A], np.uint8)).tolist() == [8, -8, 32256, -32256]


@pytest.mark.parametrize("encode, decode", CODECS.values(), ids=CODECS.keys())
def test_a_decoded_code_encodes_back_to_itself(encode, decode):
    again = encode(decode(CODES))
    assert (again == CODES).sum() == 256 - (encode is ulaw_encode)  # mu-law's negative zero, 0x7F, is +0


@pytest.mark.parametrize("name", CODECS)
def test_ffmpeg_decodes_every_code_alike_and_encodes_alike_but_at_decision_edges(name):
    """FFmpeg builds its encoder as the nearest level of a 13/14-bit sample, G.711 by its decision intervals: the
    two pick the neighbouring level only for samples at the edge of an interval, the rest exactly alike."""
    encode, decode = CODECS[name]
    assert np.array_equal(decode(CODES), _ffmpeg_decode(name, CODES))
    ours, theirs = encode(EVERY), _ffmpeg_encode(name, EVERY)
    differ = ours != theirs
    assert differ.mean() < 0.015, differ.sum()
    levels = np.unique(decode(CODES))
    rank = np.searchsorted(levels, decode(ours[differ])) - np.searchsorted(levels, decode(theirs[differ]))
    assert np.all(np.abs(rank) == 1)


def _ffmpeg_encode(name: str, pcm: np.ndarray) -> np.ndarray:
    codec = av.CodecContext.create(name, "w")
    codec.sample_rate, codec.format, codec.layout = 8000, "s16", "mono"
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    return np.frombuffer(b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)]), np.uint8)


def _ffmpeg_decode(name: str, codes: np.ndarray) -> np.ndarray:
    codec = av.CodecContext.create(name, "r")
    codec.sample_rate, codec.layout = 8000, "mono"
    return np.concatenate([f.to_ndarray().reshape(-1) for f in codec.decode(av.Packet(codes.tobytes()))])
