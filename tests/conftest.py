"""Shared fixtures: the real cpu-preset models (loaded once), real recordings, a live server; and, with
CI=true, no test passes by skipping (only tests marked `cuda` or `docker` may skip)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import pytest

from app.config import Settings, load_settings
from app.engines.loaded import Engines
from app.engines.tts.piper import PiperEngine
from app.startup import load_and_warm
from app.web.access import AccessSettings
from app.web.devices import Pairing, open_pairing
from tests.support import recording, serving

pytest_plugins = ["tests.skips", "pytester"]


@pytest.fixture(scope="session")
def jfk_pcm() -> np.ndarray:
    """11 s of real speech, 16 kHz mono float32 (tests/data/jfk.flac)."""
    return recording("jfk.flac")


@pytest.fixture(scope="session")
def cpu_settings() -> Settings:
    return load_settings("cpu", environ={})


@pytest.fixture(scope="session")
def engines(cpu_settings: Settings) -> Iterator[Engines]:
    """The real cpu preset (Whisper tiny.en, SmolLM2-135M, Piper joe), loaded once per run."""
    loaded = load_and_warm(cpu_settings)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def steady_voice(cpu_settings: Settings) -> PiperEngine:
    """The preset's Piper voice without its sampling noise: it says a text the same way on every run, for
    a test that checks by ear what one reply sounded like (the preset's voice is misheard now and then)."""
    return PiperEngine.load(msgspec.structs.replace(cpu_settings.tts.piper, noise_scale=0.0, noise_w=0.0))


@pytest.fixture(scope="session")
def live_server(cpu_settings: Settings, engines: Engines) -> Iterator[str]:
    """The real app on the cpu preset, served on a free local port; yields its base URL."""
    from app.web.server import create_app

    with serving(create_app(cpu_settings, engines)) as url:
        yield url


class PairedServer(NamedTuple):
    url: str  # https://127.0.0.1:<port>
    token: str
    cert: Path
    fingerprint: str
    folder: Path  # the token, the device list and the certificate
    pairing: Pairing


@pytest.fixture(scope="session")
def paired_server(tmp_path_factory, cpu_settings: Settings, engines: Engines) -> Iterator[PairedServer]:
    """The real app as `serve --lan` makes it (all interfaces, HTTPS, pairing), bound to loopback only, so
    the test opens nothing to the network. Its test clients connect from 127.0.0.1, so this computer is
    not trusted (access.trust_loopback off): they must pair like phones."""
    from app.web import lan
    from app.web.server import create_app

    folder = tmp_path_factory.mktemp("paired")
    tls, pairing = lan.ensure_certificate(folder), open_pairing(folder)
    settings = msgspec.structs.replace(cpu_settings, host=lan.ALL_INTERFACES,
                                       access=AccessSettings(trust_loopback=False))
    app = create_app(settings, engines, pairing=pairing, fingerprint=lan.fingerprint(tls.cert))
    with serving(app, **lan.uvicorn_tls(tls)) as url:
        yield PairedServer(url, pairing.token, tls.cert, lan.fingerprint(tls.cert), folder, pairing)


@pytest.fixture
def app_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the app's own loggers (info and up), also for a server started inside the test:
    Litestar's logging set-up replaces the root logger's handlers, caplog's among them."""
    logger = logging.getLogger("app")
    caplog.set_level(logging.INFO, logger="app")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
