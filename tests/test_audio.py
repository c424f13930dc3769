"""Opus/WebM stream decoding and PCM helpers."""

import threading

import numpy as np

from app.audio import (
    ASR_RATE,
    StreamDecoder,
    encode_webm_opus,
    float_to_int16,
    int16_to_float,
)


def decode_in_pieces(data: bytes, piece: int = 1500) -> tuple[np.ndarray, str | None, int]:
    """Feed `data` like MediaRecorder would; return (pcm, error, samples decoded before close)."""
    blocks: list[np.ndarray] = []
    done = threading.Event()
    errors: list[str | None] = []
    decoder = StreamDecoder(blocks.append, lambda e: (errors.append(e), done.set()))
    for i in range(0, len(data), piece):
        decoder.feed(data[i : i + piece])
    done.wait(0.5)  # give the thread time to decode what it has before the stream ends
    before_close = sum(len(b) for b in blocks)
    decoder.close()
    assert done.wait(10), "decoder never finished"
    pcm = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return pcm, errors[0], before_close


def test_streamed_webm_opus_decodes_to_16k_mono(jfk_pcm):
    data = b"".join(encode_webm_opus(jfk_pcm, ASR_RATE))
    pcm, error, _ = decode_in_pieces(data)
    assert error is None
    assert pcm.dtype == np.float32
    assert abs(len(pcm) - len(jfk_pcm)) < 0.05 * ASR_RATE  # same duration within 50 ms
    # Opus is lossy, but the waveform must still follow the original closely.
    n = min(len(pcm), len(jfk_pcm))
    corr = np.corrcoef(pcm[:n], jfk_pcm[:n])[0, 1]
    assert corr > 0.8, corr


def test_decoding_starts_before_the_stream_ends(jfk_pcm):
    data = b"".join(encode_webm_opus(jfk_pcm, ASR_RATE))
    blocks: list[np.ndarray] = []
    decoder = StreamDecoder(blocks.append, lambda e: None)
    decoder.feed(data[: len(data) // 2])
    deadline = threading.Event()
    for _ in range(50):
        if sum(len(b) for b in blocks) > 2 * ASR_RATE:
            break
        deadline.wait(0.05)
    assert sum(len(b) for b in blocks) > 2 * ASR_RATE, "nothing decoded from the first half"
    decoder.close()
    decoder.join(5)


def test_garbage_reports_an_error_and_ends():
    pcm, error, _ = decode_in_pieces(b"definitely not a webm stream " * 200)
    assert error is not None and "decode" in error
    assert len(pcm) == 0


def test_empty_stream_ends_with_an_error_not_a_hang():
    _, error, _ = decode_in_pieces(b"")
    assert error is not None


def test_encoder_cuts_a_live_stream_like_media_recorder(jfk_pcm):
    pieces = encode_webm_opus(jfk_pcm[: 2 * ASR_RATE], ASR_RATE, piece_ms=100)
    assert 15 <= len(pieces) <= 25  # about one piece per 100 ms
    assert pieces[0].startswith(b"\x1a\x45\xdf\xa3")  # the EBML header comes first
    assert all(len(piece) < 4000 for piece in pieces[1:])


def test_int16_round_trip():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0], dtype=np.float32)
    y = int16_to_float(float_to_int16(x))
    assert np.allclose(y, np.clip(x, -1, 1), atol=1e-4)
    assert float_to_int16(x).dtype == np.int16
