"""Shared fixtures: the real cpu-preset models (loaded once), real recordings, a live server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from app.audio import read_audio_file
from app.config import Settings, load_settings
from app.engines import Engines

AUDIO_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "audio"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    if not AUDIO_DIR.is_dir():
        pytest.skip(f"the shared recordings are missing ({AUDIO_DIR})")
    return AUDIO_DIR


@pytest.fixture(scope="session")
def jfk_pcm(audio_dir: Path) -> np.ndarray:
    """11 s of real speech, 16 kHz mono float32."""
    return read_audio_file(str(audio_dir / "jfk.flac"))


@pytest.fixture(scope="session")
def cpu_settings() -> Settings:
    return load_settings("cpu", environ={})


@pytest.fixture(scope="session")
def engines(cpu_settings: Settings) -> Iterator[Engines]:
    """The real cpu preset (Whisper tiny.en, SmolLM2-135M, Piper joe), loaded once per run."""
    loaded = Engines.load(cpu_settings)
    yield loaded
    loaded.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, **options) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port, on a thread; yields its base URL.

    `options` go to uvicorn.Config; with TLS files (ssl_certfile) the URL is https.
    """
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", **options)
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


@pytest.fixture(scope="session")
def live_server(cpu_settings: Settings, engines: Engines) -> Iterator[str]:
    """The real app on the cpu preset, served on a free local port; yields its base URL."""
    from app.server import create_app

    with serving(create_app(cpu_settings, engines)) as url:
        yield url


def resample(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Linear resampling: good enough to hand synthetic speech to a model or a fake microphone."""
    t = np.arange(int(len(pcm) * dst / src)) * (src / dst)
    return np.interp(t, np.arange(len(pcm)), pcm).astype(np.float32)


def speak(tts, text: str, rate: int) -> np.ndarray:
    """`text` said by a TtsEngine, as float32 at `rate` Hz."""
    pcm = np.concatenate(list(tts.synthesize(text))).astype(np.float32) / 32768
    return resample(pcm, tts.sample_rate, rate)


def word_error_rate(heard: str, truth: str) -> float:
    """Levenshtein distance over words, divided by the number of true words."""
    a, b = words(heard), words(truth)
    row = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, wb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wa != wb))
    return row[len(b)] / max(1, len(b))
