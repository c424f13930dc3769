"""Audio plumbing: decode the browser's compressed stream to 16 kHz mono float32, and PCM helpers."""

from __future__ import annotations

import io
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import av
import numpy as np

log = logging.getLogger(__name__)

ASR_RATE = 16_000  # what Silero VAD and Whisper expect


class _BlockingPipe(io.RawIOBase):
    """A file object whose read() waits for bytes fed from another thread; b"" after close(). At most
    `max_bytes` wait unread: feed() refuses more (a client faster than its decoder)."""

    def __init__(self, max_bytes: int) -> None:
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._buffer = b""
        self._eof = False
        self._max_bytes = max_bytes
        self._waiting = 0  # bytes fed, not yet taken by readinto()
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> bool:
        with self._lock:
            if self._waiting + len(data) > self._max_bytes:
                return False
            self._waiting += len(data)
        self._chunks.put(data)
        return True

    def close_input(self) -> None:
        self._chunks.put(None)

    def readable(self) -> bool:
        return True

    def readinto(self, out: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer and not self._eof:
            chunk = self._chunks.get()
            if chunk is None:
                self._eof = True
            else:
                self._buffer = chunk
                with self._lock:
                    self._waiting -= len(chunk)
        n = min(len(out), len(self._buffer))
        out[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


class StreamDecoder:
    """Decodes one recording (e.g. WebM/Opus from MediaRecorder) as its bytes arrive.

    PyAV pulls from a blocking pipe in a thread of its own, so a container that arrives in
    100 ms pieces is decoded continuously. Each decoded block goes to `on_pcm` as float32
    mono at 16 kHz; `on_end` is called once, with an error message if the stream was garbage.
    `container` is FFmpeg's demuxer for the container the client declared ("webm", "ogg", "mp4",
    "wav"): the only one tried, so a client's bytes never reach every demuxer FFmpeg has by probing.
    At most `max_pending` bytes wait for the decoder (limits.max_pending_audio_bytes).
    """

    def __init__(
        self, on_pcm: Callable[[np.ndarray], None], on_end: Callable[[str | None], None], container: str = "webm",
        *, max_pending: int = 1024 * 1024,
    ) -> None:
        self._container = container
        self._pipe = _BlockingPipe(max_pending)
        self._on_pcm = on_pcm
        self._on_end = on_end
        self._bytes_in = 0
        self._thread = threading.Thread(target=self._run, name="audio-decoder", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> bool:
        """More of the stream; False: max_pending bytes wait for the decoder already, and `data` was dropped."""
        self._bytes_in += len(data)
        return self._pipe.feed(data)

    def close(self) -> None:
        """No more bytes: the decoder drains what it has, then calls on_end."""
        self._pipe.close_input()

    def _run(self) -> None:
        error: str | None = None
        try:
            self._decode_all()
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            error = f"could not decode the audio stream: {exc}"
            log.info("audio decode failed after %d bytes: %s", self._bytes_in, exc)
            self._drain_pipe()
        self._on_end(error)

    def _decode_all(self) -> None:
        with av.open(self._pipe, mode="r", format=self._container) as container:
            if not container.streams.audio:
                raise ValueError("no audio track in the stream")
            for pcm in mono_pieces(container, ASR_RATE):
                self._on_pcm(pcm)

    def _drain_pipe(self) -> None:
        # After a failure keep swallowing input so that feed() never backs up.
        buf = bytearray(65536)
        while self._pipe.readinto(buf):
            pass


def mono_pieces(container: av.container.InputContainer, rate: int) -> Iterator[np.ndarray]:
    """The first audio track of an opened `container`, piece by piece as it decodes: mono float32 at `rate`,
    the resampler drained at the end."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    for frame in itertools.chain(container.decode(audio=0), [None]):  # None drains the resampler
        for out in resampler.resample(frame):
            yield out.to_ndarray().reshape(-1).copy()


def read_audio_file(path: str, rate: int = ASR_RATE) -> np.ndarray:
    """Any file PyAV can read -> mono float32 at `rate`, shape (samples,)."""
    with av.open(path) as container:
        parts = list(mono_pieces(container, rate))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class NotAudio(ValueError):
    """Bytes that are not audio in the container they were said to be, or hold more than allowed."""


class AudioTooLong(NotAudio):
    """Audio that holds more seconds than allowed (decoding stopped there)."""


def decode_file(data: bytes, container: str, max_seconds: float, rate: int = ASR_RATE) -> np.ndarray:
    """A whole file's bytes in FFmpeg's demuxer `container` (the only one tried) -> mono float32 at `rate`;
    NotAudio when it cannot be read, AudioTooLong when it holds more than `max_seconds` (decoding stops there)."""
    parts: list[np.ndarray] = []
    total, most = 0, int(max_seconds * rate)
    try:
        with av.open(io.BytesIO(data), mode="r", format=container) as opened:
            if not opened.streams.audio:
                raise NotAudio("no audio track")
            for pcm in mono_pieces(opened, rate):
                parts.append(pcm)
                total += len(pcm)
                if total > most:
                    raise AudioTooLong(f"longer than {max_seconds:g} s")
    except (av.error.FFmpegError, ValueError, OSError, IndexError) as exc:
        raise exc if isinstance(exc, NotAudio) else NotAudio(str(exc)) from exc
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
