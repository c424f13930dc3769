"""The Litestar app: page, health, status fragment, static files and the conversation WebSocket."""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from litestar import Litestar, MediaType, Request, get, websocket
from litestar.connection import WebSocket
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.datastructures import State
from litestar.response import Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from .config import Settings
from .engines import Engines
from .lan import LOOPBACK_NAMES, phone_url, qr_svg
from .metrics import Metrics
from .session import Session

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Voice assistant"


@get("/", include_in_schema=False)
async def index(request: Request, state: State) -> Template:
    bind = state.settings.host
    context = {"title": TITLE, "ws_path": "/ws", "phone_url": phone_url(str(request.base_url), bind),
               "on_lan": bind not in LOOPBACK_NAMES}
    return Template("index.html", context=context)


@get("/qr.svg", media_type="image/svg+xml", include_in_schema=False)
async def qr_code(request: Request, state: State) -> str:
    """The page's address for a phone as a QR code (the LAN IP when this page was opened as localhost)."""
    return qr_svg(phone_url(str(request.base_url), state.settings.host))


@get("/health")
async def health(state: State) -> dict[str, object]:
    engines: Engines = state.engines
    return {"status": "ok", "preset": engines.settings.preset, **engines.describe()}


@get("/status", media_type=MediaType.HTML, include_in_schema=False)
async def status(state: State) -> str:
    """A fragment that the page polls with htmx."""
    engines: Engines = state.engines
    d = engines.describe()
    return (
        f'<span class="ok">Ready</span> · preset <b>{engines.settings.preset}</b> · '
        f"speech-to-text {_short(d['asr'])} · language model {_short(d['llm'])} · "
        f"voice {_short(d['tts'])}"
    )


def _short(ref: str) -> str:
    """A model reference as a person would name it: the package, file or repo, HTML-escaped."""
    if ref.startswith("pkg:"):
        name = ref[4:].split("/", 1)[0]
    else:
        name = ref.rstrip("/").rsplit("/", 1)[-1]
    return html.escape(name)


@get("/metrics", media_type="text/plain; version=0.0.4", include_in_schema=False)
async def metrics(state: State) -> bytes:
    """Prometheus text format: per-stage latency histograms, turn, error and session counts."""
    return state.metrics.render()


@websocket("/ws")
async def conversation(socket: WebSocket, state: State) -> None:
    await socket.accept()
    session = Session(state.engines, state.metrics)
    log.info("session %s opened from %s", session.id, socket.client)
    await session.serve(socket.receive, socket.send_text, socket.send_bytes)


def create_app(settings: Settings, engines: Engines | None = None) -> Litestar:
    """Wire the app. Models load (and warm up) in the lifespan unless `engines` is given."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        own = engines is None
        app.state.engines = await asyncio.to_thread(Engines.load, settings) if own else engines
        log.info("ready: preset %s, listening on http://%s:%d", settings.preset, settings.host, settings.port)
        try:
            yield
        finally:
            if own:
                app.state.engines.close()

    return Litestar(
        route_handlers=[
            index,
            health,
            status,
            qr_code,
            metrics,
            conversation,
            create_static_files_router(path="/static", directories=[ROOT / "static"]),
        ],
        lifespan=[lifespan],
        template_config=TemplateConfig(directory=ROOT / "templates", engine=JinjaTemplateEngine),
        state=State({"settings": settings, "metrics": Metrics()}),
    )
