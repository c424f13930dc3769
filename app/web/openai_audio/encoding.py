"""The speech endpoint's audio formats: the voice's int16 PCM -> mp3, opus (in Ogg), aac (ADTS), flac, wav or raw
PCM, mono at 24 kHz (what OpenAI sends), encoded as it comes, so that a streamed answer starts with the first
phrase. `speed` is FFmpeg's atempo: the tempo changes, the pitch does not."""

from __future__ import annotations

import struct

import av
import numpy as np

OUT_RATE = 24_000
# response_format -> (FFmpeg muxer, encoder); wav and pcm are written here.
CODECS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"), "flac": ("flac", "flac")}
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}
FORMATS = tuple(MEDIA_TYPES)
UNKNOWN_LENGTH = 0xFFFFFFFF  # a streamed WAV's sizes, as OpenAI writes them: read to the end of the data


class _Sink:
    """Where the muxer writes: it keeps what was written since it was last taken. It has no seek, so a muxer
    never goes back to rewrite a header (which a stream already sent)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> int:
        self._data += data
        return len(data)

    def take(self) -> bytes:
        data, self._data = bytes(self._data), bytearray()
        return data


class Encoder:
    """One answer's audio: add() PCM as the voice makes it and send what it returns; finish() gives the rest."""

    def __init__(self, response_format: str, in_rate: int, speed: float = 1.0) -> None:
        self.format = response_format
        self._in_rate = in_rate
        self._samples = 0
        self._tempo = _tempo_graph(in_rate, speed) if speed != 1.0 else None
        self._sink = _Sink()
        self._container = None
        self._header = response_format == "wav"
        if response_format in CODECS:
            muxer, codec = CODECS[response_format]
            self._container = av.open(self._sink, mode="w", format=muxer)
            self._stream = self._container.add_stream(codec, rate=OUT_RATE, layout="mono")
            codec_format = self._stream.codec_context.format.name
        else:
            codec_format = "s16"
        self._resampler = av.AudioResampler(format=codec_format, layout="mono", rate=OUT_RATE)

    def add(self, pcm: np.ndarray) -> bytes:
        """Mono int16 PCM at the voice's rate, shape (samples,)."""
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate, frame.pts = self._in_rate, self._samples
        self._samples += len(pcm)
        return self._out(self._tempo_of(frame))

    def finish(self) -> bytes:
        data = self._out(self._tempo_of(None)) + self._out([None])
        if self._container is not None:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            data += self._sink.take()
        return data

    def _tempo_of(self, frame: av.AudioFrame | None) -> list[av.AudioFrame | None]:
        if self._tempo is None:
            return [frame] if frame is not None else []
        self._tempo.push(frame)
        frames = []
        while True:
            try:
                frames.append(self._tempo.pull())
            except (av.error.BlockingIOError, av.error.EOFError):
                return frames

    def _out(self, frames: list[av.AudioFrame | None]) -> bytes:
        data = b""
        for frame in frames:
            for resampled in self._resampler.resample(frame):
                if self._container is None:
                    data += self._wav_header() + resampled.to_ndarray().astype("<i2").tobytes()
                    continue
                for packet in self._stream.encode(resampled):
                    self._container.mux(packet)
        return data + (self._sink.take() if self._container is not None else b"")

    def _wav_header(self) -> bytes:
        if not self._header:
            return b""
        self._header = False
        return wav_header(OUT_RATE, UNKNOWN_LENGTH)


def wav_header(rate: int, data_bytes: int) -> bytes:
    """RIFF/WAVE header of mono 16-bit PCM; UNKNOWN_LENGTH for a stream."""
    riff = UNKNOWN_LENGTH if data_bytes == UNKNOWN_LENGTH else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


def _tempo_graph(rate: int, speed: float) -> av.filter.Graph:
    """FFmpeg's atempo, chained: one instance takes 0.5 to 2.0 (OpenAI's speed goes from 0.25 to 4)."""
    graph = av.filter.Graph()
    node = graph.add("abuffer", sample_rate=str(rate), sample_fmt="s16", channel_layout="mono",
                     time_base=f"1/{rate}")
    left = speed
    while left < 0.5 or left > 2.0:
        step = 0.5 if left < 0.5 else 2.0
        nxt = graph.add("atempo", str(step))
        node.link_to(nxt)
        node, left = nxt, left / step
    last = graph.add("atempo", f"{left:.6f}")
    node.link_to(last)
    sink = graph.add("abuffersink")
    last.link_to(sink)
    graph.configure()
    return graph
