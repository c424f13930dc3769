"""Opus/WebM stream decoding, reading audio files, and PCM helpers."""

from __future__ import annotations

import threading
import time

import numpy as np

from app.audio import ASR_RATE, StreamDecoder, float_to_int16, read_audio_file
from tests.support import DATA, encode_ogg_opus, encode_webm_opus

WAIT_S = 30  # generous: the decoder thread shares 2 cores with the rest of the suite


class Decoded:
    """Collects what a StreamDecoder gives, and lets a test wait for it instead of sleeping."""

    def __init__(self, container: str = "webm") -> None:
        self.blocks: list[np.ndarray] = []
        self.error: str | None = None
        self.ended = threading.Event()
        self._more = threading.Condition()
        self.decoder = StreamDecoder(self._on_pcm, self._on_end, container)

    def _on_pcm(self, pcm: np.ndarray) -> None:
        with self._more:
            self.blocks.append(pcm)
            self._more.notify_all()

    def _on_end(self, error: str | None) -> None:
        self.error = error
        self.ended.set()

    @property
    def samples(self) -> int:
        return sum(len(b) for b in self.blocks)

    def wait_for(self, samples: int) -> bool:
        with self._more:
            return self._more.wait_for(lambda: self.samples >= samples, timeout=WAIT_S)

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.float32)


def decode_in_pieces(data: bytes, piece: int = 1500, *, while_open: int = 0,
                     container: str = "webm") -> tuple[np.ndarray, str | None]:
    """Feed `data` like MediaRecorder would, declared as `container`, and return (pcm, error). With `while_open`,
    first wait until that many samples came out while the stream is still open: proof that it decodes as it goes."""
    decoded = Decoded(container)
    for i in range(0, len(data), piece):
        decoded.decoder.feed(data[i : i + piece])
    if while_open:
        assert decoded.wait_for(while_open), f"only {decoded.samples} samples decoded before the stream ended"
        assert not decoded.ended.is_set()
    decoded.decoder.close()
    assert decoded.ended.wait(WAIT_S), "decoder never finished"
    return decoded.pcm(), decoded.error


def test_streamed_webm_opus_decodes_to_16k_mono(jfk_pcm):
    data = b"".join(encode_webm_opus(jfk_pcm, ASR_RATE))
    pcm, error = decode_in_pieces(data, while_open=ASR_RATE)
    assert error is None
    assert pcm.dtype == np.float32
    assert abs(len(pcm) - len(jfk_pcm)) < 0.05 * ASR_RATE  # same duration within 50 ms
    # Opus is lossy, but the waveform must still follow the original closely.
    n = min(len(pcm), len(jfk_pcm))
    corr = np.corrcoef(pcm[:n], jfk_pcm[:n])[0, 1]
    assert corr > 0.8, corr


def test_bytes_the_decoder_has_not_read_are_bounded_and_feed_says_when_one_is_dropped(jfk_pcm):
    data = b"".join(encode_webm_opus(np.concatenate([jfk_pcm] * 3), ASR_RATE))  # about 200 KB
    go, ended = threading.Event(), threading.Event()
    decoder = StreamDecoder(lambda pcm: go.wait(WAIT_S), lambda error: ended.set(), max_pending=8 * 1024)
    fed = [decoder.feed(data[i : i + 1500]) for i in range(0, len(data), 1500)]  # stuck on its first block
    assert not all(fed), "every piece was taken while the decoder was stuck"
    assert sum(fed) * 1500 < len(data) // 2
    go.set()  # the decoder reads on: the pipe empties and takes more again
    deadline = time.monotonic() + WAIT_S
    while not decoder.feed(b"\x00" * 1500):
        assert time.monotonic() < deadline, "the pipe never emptied"
        time.sleep(0.05)
    decoder.close()
    assert ended.wait(WAIT_S)


def test_decoding_starts_before_the_stream_ends(jfk_pcm):
    data = b"".join(encode_webm_opus(jfk_pcm, ASR_RATE))
    decoded = Decoded()
    decoded.decoder.feed(data[: len(data) // 2])
    assert decoded.wait_for(2 * ASR_RATE), "nothing decoded from the first half"
    assert not decoded.ended.is_set()
    decoded.decoder.close()
    assert decoded.ended.wait(WAIT_S) and decoded.error is None


def test_ogg_opus_sent_a_page_at_a_time_decodes_each_page_before_the_next_comes(jfk_pcm):
    """The page's WebCodecs recorder sends one 20 ms Opus packet per Ogg page (static/audio.js): once
    the stream's start is read, each page's audio must come out without waiting for the next page."""
    pieces = encode_ogg_opus(jfk_pcm[: 3 * ASR_RATE], ASR_RATE, frame_ms=20)
    assert len(pieces) == 3 * 50 + 1  # one per 20 ms, and one that drains the encoder
    per_page, behind = ASR_RATE // 50, ASR_RATE // 100  # a page's samples; the encoder's and resampler's delay
    decoded = Decoded("ogg")
    for piece in pieces[:50]:
        decoded.decoder.feed(piece)
    for k in range(50, 60):
        decoded.decoder.feed(pieces[k])
        assert decoded.wait_for((k + 1) * per_page - behind), f"page {k} waited for the next one"
    for piece in pieces[60:]:
        decoded.decoder.feed(piece)
    decoded.decoder.close()
    assert decoded.ended.wait(WAIT_S) and decoded.error is None
    pcm = decoded.pcm()
    assert abs(len(pcm) - 3 * ASR_RATE) <= per_page  # the same duration, within one packet
    assert np.corrcoef(pcm[: 3 * ASR_RATE - per_page], jfk_pcm[: 3 * ASR_RATE - per_page])[0, 1] > 0.8


def test_garbage_reports_an_error_and_ends():
    pcm, error = decode_in_pieces(b"definitely not a webm stream " * 200)
    assert error is not None and "decode" in error
    assert len(pcm) == 0


def test_empty_stream_ends_with_an_error_not_a_hang():
    _, error = decode_in_pieces(b"")
    assert error is not None


def test_encoder_cuts_a_live_stream_like_media_recorder(jfk_pcm):
    pieces = encode_webm_opus(jfk_pcm[: 2 * ASR_RATE], ASR_RATE, piece_ms=100)
    assert 15 <= len(pieces) <= 25  # about one piece per 100 ms
    assert pieces[0].startswith(b"\x1a\x45\xdf\xa3")  # the EBML header comes first
    assert all(len(piece) < 4000 for piece in pieces[1:])


def test_float_to_int16_scales_and_clips():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0], dtype=np.float32)
    assert float_to_int16(x).tolist() == [0, 16383, -16383, 32767, -32767, 32767, -32767]
    assert float_to_int16(x).dtype == np.int16  # what the s16le wire format needs


def test_read_audio_file_gives_mono_float32_at_any_rate():
    path = str(DATA / "jfk.flac")
    at_16k, at_24k = read_audio_file(path), read_audio_file(path, 24_000)
    assert at_16k.dtype == at_24k.dtype == np.float32 and at_16k.ndim == at_24k.ndim == 1
    assert abs(len(at_16k) / ASR_RATE - 11.0) < 0.1 and abs(len(at_24k) / 24_000 - 11.0) < 0.1
    assert 0.01 < float(at_24k.std()) < 0.5  # speech, not silence or noise at full scale
    # the same sound at both rates: every third sample at 24 kHz is every second one at 16 kHz
    n = min(len(at_16k) // 2, len(at_24k) // 3)
    assert np.corrcoef(at_16k[: 2 * n : 2], at_24k[: 3 * n : 3])[0, 1] > 0.95
