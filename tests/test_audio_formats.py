"""The containers a recording may be in (WebM, Ogg, Safari's fragmented MP4/AAC, WAV), streamed in pieces, each
decoded only as the container its audio_start declares."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from app.audio import ASR_RATE, float_to_int16
from app.web.ws_protocol import AudioStart
from tests.test_audio import decode_in_pieces

# What Safari's MediaRecorder produces: an empty moov up front, then one moof+mdat per fragment,
# so the stream can be decoded before it ends.
FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}


def encode(pcm: np.ndarray, rate: int, *, container: str, codec: str, options: dict[str, str]) -> bytes:
    """Mono float32 PCM -> one whole recording in `container`/`codec`, at 48 kHz like a microphone."""
    sink = io.BytesIO()
    with av.open(sink, mode="w", format=container, options=options) as out:
        stream = out.add_stream(codec, rate=48_000, layout="mono")
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=48_000)
        frame = av.AudioFrame.from_ndarray(float_to_int16(pcm).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        for resampled in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(resampled):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return sink.getvalue()


# What each browser records, by the MIME type its audio_start declares, as (container, codec, options).
RECORDINGS = {
    "audio/webm;codecs=opus": ("webm", "libopus", {}),  # Chromium's MediaRecorder
    "audio/ogg; codecs=opus": ("ogg", "libopus", {}),  # Firefox's, and the page's own WebCodecs writer
    "audio/mp4": ("mp4", "aac", FRAGMENTED_MP4),  # Safari's
    "audio/wav": ("wav", "pcm_s16le", {}),
}


@pytest.mark.parametrize("mime_type", RECORDINGS)
def test_each_container_decodes_as_it_streams_when_declared(jfk_pcm: np.ndarray, mime_type: str) -> None:
    container, codec, options = RECORDINGS[mime_type]
    data = encode(jfk_pcm, ASR_RATE, container=container, codec=codec, options=options)
    if container == "mp4":  # the point of the test: the index comes first, fragments after
        assert data[4:8] == b"ftyp" and b"moof" in data
    declared = AudioStart(mime_type).container
    assert declared is not None
    pcm, error = decode_in_pieces(data, piece=1000, while_open=ASR_RATE, container=declared)  # as it streams
    assert error is None
    assert abs(len(pcm) - len(jfk_pcm)) < 0.1 * ASR_RATE  # codec padding aside, the same duration
    offset = best_offset(pcm, jfk_pcm)
    n = min(len(pcm) - offset, len(jfk_pcm))
    corr = np.corrcoef(pcm[offset : offset + n], jfk_pcm[:n])[0, 1]
    assert corr > 0.9, f"{container}/{codec}: correlation {corr:.3f} at offset {offset}"


@pytest.fixture(scope="module")
def one_second(jfk_pcm: np.ndarray) -> dict[str, bytes]:
    """A second of speech in each container, by its MIME type."""
    return {mime: encode(jfk_pcm[ASR_RATE : 2 * ASR_RATE], ASR_RATE, container=c, codec=codec, options=options)
            for mime, (c, codec, options) in RECORDINGS.items()}


@pytest.mark.parametrize(("made", "declared"), [(a, b) for a in RECORDINGS for b in RECORDINGS if a != b])
def test_a_stream_declared_as_another_container_is_an_error_not_probed(one_second, made: str, declared: str) -> None:
    """The decoder opens only the declared container: FFmpeg would have found the real one by probing."""
    container = AudioStart(declared).container
    assert container is not None
    pcm, error = decode_in_pieces(one_second[made], piece=1000, container=container)
    assert error is not None and "decode" in error
    assert len(pcm) == 0


def best_offset(decoded: np.ndarray, truth: np.ndarray, max_shift: int = ASR_RATE // 10) -> int:
    """AAC adds priming samples in front: find the shift that lines the two signals up."""
    window = truth[ASR_RATE : 2 * ASR_RATE]
    scores = [float(np.dot(decoded[ASR_RATE + s : 2 * ASR_RATE + s], window)) for s in range(max_shift)]
    return int(np.argmax(scores))
