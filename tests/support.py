"""What the tests and the benchmarks share, and the product does not run: the recordings kept in the
repo, speech and WebM/Opus streams made the way a browser makes them, a server on a thread, a
WebSocket client that never reads, a start-up status that keeps its history, and a stand-in for the
Llama tokenizer (which needs a download)."""

from __future__ import annotations

import base64
import io
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np

from app.audio import ASR_RATE, float_to_int16, read_audio_file
from app.engines.llm import LlmSettings
from app.engines.loading import LoadState, LoadStatus

DATA = Path(__file__).resolve().parent / "data"  # recordings, with their sources in data/README.md
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


def recording(name: str, rate: int = ASR_RATE) -> np.ndarray:
    """A recording from tests/data as mono float32 at `rate` Hz."""
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the recordings are part of the repository")
    return read_audio_file(str(path), rate)


# Whisper writes a number as a word or in digits ("eight legs", "8 legs"): either is the same word.
NUMBERS = {word: str(n) for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, small numbers in digits, for comparing transcripts."""
    plain = "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()
    return [NUMBERS.get(w, w) for w in plain]


def word_error_rate(heard: str, truth: str) -> float:
    """Levenshtein distance over words, divided by the number of true words."""
    a, b = words(heard), words(truth)
    row = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, wb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wa != wb))
    return row[len(b)] / max(1, len(b))


def said_so_far(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages an LLM was given, less the system prompt and the example exchange (app/engines/llm.py):
    the conversation itself."""
    return messages[1 + len(LlmSettings().example) :]


def resample(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Linear resampling: good enough to hand synthetic speech to a model or a fake microphone."""
    t = np.arange(int(len(pcm) * dst / src)) * (src / dst)
    return np.interp(t, np.arange(len(pcm)), pcm).astype(np.float32)


def speak(tts, text: str, rate: int) -> np.ndarray:
    """`text` said by a TtsEngine, as float32 at `rate` Hz."""
    pcm = np.concatenate(list(tts.synthesize(text))).astype(np.float32) / 32768
    return resample(pcm, tts.sample_rate, rate)


def encode_webm_opus(pcm: np.ndarray, rate: int, piece_ms: int = 100) -> list[bytes]:
    """Encode mono float32 PCM as live WebM/Opus, cut the way MediaRecorder's timeslice cuts it:
    piece i holds the bytes produced by the first (i+1) * piece_ms of audio; b"".join() gives the
    whole file.

    FFmpeg's muxer writes a cluster only when it closes; Chromium's writes each frame as it is
    encoded. One-frame clusters keep what a piece holds close to what the browser sends: a piece
    here holds its audio up to ~66 ms before its end; Chromium's (60 ms frames) up to ~50-58 ms
    before it is sent (measured in headless Chromium 2026-11-29)."""
    sink = io.BytesIO()
    options = {"live": "1", "cluster_time_limit": "1", "cluster_size_limit": "1"}
    pieces: list[bytes] = []
    with av.open(sink, mode="w", format="webm", options=options) as container:
        stream = container.add_stream("libopus", rate=48_000, layout="mono")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
        step = rate * piece_ms // 1000
        for start in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(
                float_to_int16(pcm[start : start + step]).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = rate
            for resampled in resampler.resample(frame):
                for packet in stream.encode(resampled):
                    container.mux(packet)
            pieces.append(_take(sink))
        for resampled in resampler.resample(None):
            for packet in stream.encode(resampled):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    pieces.append(_take(sink))
    return [piece for piece in pieces if piece]


def encode_ogg_opus(pcm: np.ndarray, rate: int, frame_ms: int = 20) -> list[bytes]:
    """Encode mono float32 PCM as Ogg/Opus the way the page's WebCodecs recorder sends it
    (static/audio.js): the two header pages with the first packet's page, then one page per
    `frame_ms` packet, each as soon as its audio is in. b"".join() gives the whole file."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format = 48_000, "mono", "s16"
    codec.bit_rate = 32_000
    codec.options = {"frame_duration": str(frame_ms)}
    pcm48 = float_to_int16(resample(pcm, rate, 48_000))
    step = 48 * frame_ms
    pcm48 = np.concatenate([pcm48, np.zeros(-len(pcm48) % step, np.int16)])
    writer = _OggWriter()
    headers = writer.page(_OPUS_HEAD, 0, 0x02) + writer.page(_OPUS_TAGS, 0, 0)  # 0x02: first page
    pieces, granule = [], 0
    for start in range(0, len(pcm48) + step, step):  # one more frame drains the encoder's lookahead
        chunk = pcm48[start : start + step] if start < len(pcm48) else np.zeros(step, np.int16)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48_000, start
        piece = b""
        for packet in codec.encode(frame):
            granule += step
            piece += writer.page(bytes(packet), granule, 0)
        pieces.append(piece)
    pieces[0] = headers + pieces[0]
    return pieces


# Version 1, one channel, 312 samples of encoder delay to skip (libopus at 48 kHz), 48 kHz, no gain.
_OPUS_HEAD = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48_000, 0, 0)
_OPUS_TAGS = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)  # vendor, no comments


class _OggWriter:
    """Ogg pages of one logical stream, one packet a page (what static/audio.js writes)."""

    def __init__(self) -> None:
        self.sequence = 0

    def page(self, packet: bytes, granule: int, flags: int) -> bytes:
        lacing = [255] * (len(packet) // 255) + [len(packet) % 255]
        header = struct.pack("<4sBBqIII", b"OggS", 0, flags, granule, 0x5EED, self.sequence, 0)
        self.sequence += 1
        page = bytearray(header + bytes([len(lacing), *lacing]) + packet)
        struct.pack_into("<I", page, 22, _ogg_crc(page))
        return bytes(page)


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[((crc >> 24) ^ byte) & 0xFF]
    return crc


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7 if r & 0x80000000 else r << 1) & 0xFFFFFFFF
        table.append(r)
    return table


_OGG_CRC_TABLE = _ogg_crc_table()


def _take(sink: io.BytesIO) -> bytes:
    data = sink.getvalue()
    sink.seek(0)
    sink.truncate()
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trusting(cert: Path) -> ssl.SSLContext:
    """A client's TLS context that trusts the server's own certificate, as a phone that accepted the warning.

    TLS 1.2 at most, for websockets' sync client (and the openai SDK's, which is the same): it reads on a thread
    of its own while the caller's thread writes, and Python's ssl sockets are not safe for that. Under TLS 1.3 the
    server's session tickets arrive just as the upgrade request is written: 9 of 2,300 handshakes lost or garbled
    their response (tests/web/test_access.py's race, uvloop or asyncio alike); with TLS 1.2, 0 of 2,400."""
    context = ssl.create_default_context(cafile=str(cert))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@contextmanager
def serving(app, port: int | None = None, **options) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port (or `port`: a server restarted where it was), on a
    thread; yields its base URL.

    `options` go to uvicorn.Config; with TLS files (ssl_certfile) the URL is https. Frames are
    limited as `voice-assistant serve` limits them (the app's limits.max_frame_bytes).
    """
    import uvicorn

    settings = getattr(getattr(app, "state", None), "settings", None)
    if settings is not None:
        options.setdefault("ws_max_size", settings.limits.max_frame_bytes)

    options.setdefault("log_level", "warning")
    config = uvicorn.Config(app, host="127.0.0.1", port=port or free_port(), **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    scheme = "https" if options.get("ssl_certfile") else "http"
    try:
        yield f"{scheme}://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def raw_client(url: str) -> socket.socket:
    """A WebSocket client that reads nothing after the handshake, with a small receive buffer."""
    host, port = url.split("//")[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def send_text_frame(sock: socket.socket, text: str) -> None:
    data, mask = text.encode(), os.urandom(4)
    header = struct.pack("!BBH", 0x81, 0x80 | 126, len(data)) if len(data) >= 126 else struct.pack(
        "!BB", 0x81, 0x80 | len(data))
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


TOKENIZER_SENTENCES = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I am a small voice assistant, and I speak clearly.",
    "Ask not what your country can do for you.",
]


def build_tokenizer_json(path: Path, texts: list[str] = TOKENIZER_SENTENCES) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, with Llama's BOS/EOS names (ids 0, 1):
    the stand-in for the Llama-3.2 tokenizer in CSM tests and benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


class RecordingStatus(LoadStatus):
    """A LoadStatus that keeps every state it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[LoadState] = []

    def set(self, phase, message, done_bytes=0, total_bytes=0) -> None:
        super().set(phase, message, done_bytes, total_bytes)
        self.history.append(self.state)
