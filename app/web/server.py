"""The Litestar app: page, health, status fragment, static files and the conversation WebSocket.

`create_app` only wires them: routes, state, the access checks (access.py: Host, same-origin /ws, the
pairing of a server that listens beyond loopback; pairing.py: its link and devices), the security
headers (headers.py) and a lifespan that loads the models on a thread (app/startup.py) while the port
is already open. A WebSocket on /ws goes next to ws.py's WsSession, the adapter in front of the
conversation core (app/core/conversation.py); one on /v1/realtime to realtime/session.py's
RealtimeSession, the OpenAI Realtime protocol over the same core.
"""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import msgspec
from litestar import Litestar, MediaType, Request, Response, get, websocket
from litestar.connection import WebSocket
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from app.config import Settings
from app.core import events as ev
from app.core.limits import ClientSessions
from app.core.metrics import Metrics
from app.engines.loaded import Engines
from app.engines.loading import LoadState, LoadStatus
from app.startup import BackgroundLoad
from app.web import access, devices, headers
from app.web import ws_protocol as p
from app.web.devices import Pairing
from app.web.lan import is_loopback, phone_url, qr_svg, token_link
from app.web.openai_audio.routes import router as openai_audio_router
from app.web.pairing import ROUTES as PAIRING_ROUTES
from app.web.pairing import TITLE, pairing_step
from app.web.realtime.errors import error_event
from app.web.realtime.protocol import encode as encode_realtime
from app.web.realtime.session import RealtimeSession
from app.web.ws import WsSession
from app.web.wyoming.server import WyomingServer

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the repository: static/ and templates/ beside app/
# A failure's reason names paths and models: the log has it, no response does.
LOAD_FAILED = "The models could not be loaded; the server log says why."


@get("/", include_in_schema=False)
async def index(request: Request, state: State) -> Template | Redirect:
    """The page; on a server that pairs, first the pairing (pairing.py): the link pairs this browser, an
    unpaired one gets a page that says how."""
    step = pairing_step(request, state)
    if step is not None:
        return step
    bind = state.settings.host
    context = {"title": TITLE, "ws_path": "/ws", "phone_url": _phone_link(request, state),
               "on_lan": not is_loopback(bind), "fingerprint": state.fingerprint,
               "pairing": state.pairing is not None}
    return Template("index.html", context=context)


@get("/qr.svg", media_type="image/svg+xml", include_in_schema=False, guards=[access.require_pairing])
async def qr_code(request: Request, state: State) -> str:
    """The page's address for a phone as a QR code (the LAN IP when this page was opened as localhost),
    with the pairing token: only a paired browser (or this computer) gets this far, and it is not cached."""
    return qr_svg(_phone_link(request, state), title="The link that pairs a phone")


def _phone_link(request: Request, state: State) -> str:
    token = state.pairing.token if state.pairing is not None else None
    return token_link(phone_url(str(request.base_url), state.settings.host), token)


@get("/health")
async def health(request: Request, state: State) -> Response[dict[str, object]]:
    """200 "ok" once every model is loaded and warm; 503 "loading" before that, with the progress;
    500 "failed" (the reason is in the log only). On a server that pairs, a stranger learns only that
    much: the preset, models and backend are for paired devices and this computer."""
    now: LoadState = state.loading.state
    code, word = {"ready": (200, "ok"), "failed": (500, "failed")}.get(now.phase, (503, "loading"))
    if not access.paired(request):
        return Response({"status": word, "phase": now.phase, "done_bytes": now.done_bytes,
                         "total_bytes": now.total_bytes}, status_code=code)
    if now.phase == "ready":
        engines: Engines = state.engines
        return Response({"status": "ok", "preset": state.settings.preset, **state.settings.models(),
                         "llm_backend": engines.llm_backend()})
    if now.phase == "failed":
        return Response({"status": "failed", "error": LOAD_FAILED}, status_code=500)
    body = {"status": "loading", "preset": state.settings.preset, **msgspec.structs.asdict(now)}
    return Response(body, status_code=503)


@get("/status", media_type=MediaType.HTML, include_in_schema=False, guards=[access.require_pairing])
async def status(state: State) -> str:
    """A fragment that the page polls with htmx; while loading it asks again every second by itself."""
    now: LoadState = state.loading.state
    if now.phase == "failed":
        return f'<span class="error">Could not start</span> · {LOAD_FAILED}'
    if now.phase != "ready":
        # Replaces itself a second later (outerHTML), so progress moves faster than the page's
        # own 10 s poll; the ready fragment carries no trigger, which ends the fast polling.
        return (
            '<span hx-get="/status" hx-trigger="load delay:1s" hx-swap="outerHTML">'
            f'<span class="loading">Starting</span> · {html.escape(now.message)}</span>'
        )
    d = state.settings.models()
    return (
        f'<span class="ok">Ready</span> · preset <b>{state.settings.preset}</b> · '
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


@get("/metrics", media_type="text/plain; version=0.0.4", include_in_schema=False, guards=[access.require_pairing])
async def metrics(state: State) -> bytes:
    """Prometheus text format: per-stage latency histograms, turn, error and session counts."""
    return state.metrics.render()


# Both checks run before the handshake completes: a refused socket gets HTTP 403 and never a byte.
@websocket("/ws", guards=[access.same_origin, access.require_pairing])
async def conversation(socket: WebSocket, state: State) -> None:
    await socket.accept()
    if state.loading.state.phase != "ready":
        await _not_yet(socket, state.loading.state)
        return
    with state.clients.hold(_address(socket)) as held:
        if not held:
            await _too_many(socket, state)
            return
        session = WsSession(state.engines, state.settings, state.metrics)
        log.info("session %s opened from %s", session.id, socket.client)
        await session.serve(socket.receive, socket.send_text, socket.send_bytes)


# The OpenAI Realtime protocol (realtime/session.py), for the SDKs and clients that speak it: the same
# checks (programs send the pairing token as `Authorization: Bearer`) and the same conversation core.
@websocket("/v1/realtime", guards=[access.same_origin, access.require_pairing])
async def realtime(socket: WebSocket, state: State) -> None:
    offered = socket.scope.get("subprotocols") or []
    await socket.accept(subprotocols="realtime" if "realtime" in offered else None)  # browsers offer it
    if state.loading.state.phase != "ready":
        await _not_yet(socket, state.loading.state, encode=_realtime_error)
        return
    with state.clients.hold(_address(socket)) as held:
        if not held:
            await _too_many(socket, state, encode=_realtime_error)
            return
        session = RealtimeSession(state.engines, state.settings, state.metrics)
        log.info("realtime session %s opened from %s", session.id, socket.client)
        await session.serve(socket.receive, socket.send_text)


def _address(socket: WebSocket) -> str:
    """The client's address, whose sessions count together (limits.max_sessions_per_client)."""
    return socket.client.host if socket.client is not None else ""


async def _too_many(socket: WebSocket, state: State, encode: Callable[[ev.Error], str] = p.encode_event) -> None:
    """The client's address holds max_sessions_per_client sessions already: say so and close (1013, try again
    later, as `busy`)."""
    log.warning("session from %s refused: it has %d open (limits.max_sessions_per_client)", _address(socket),
                state.clients.count(_address(socket)))
    state.metrics.errors.labels("too_many_sessions").inc()
    await _turn_away(socket, ev.error("too_many_sessions"), encode)


async def _not_yet(socket: WebSocket, now: LoadState, encode: Callable[[ev.Error], str] = p.encode_event) -> None:
    """No conversation before the models are ready: say why in words and close politely
    (1013: try again later); the page reconnects with backoff."""
    if now.phase == "failed":
        event = ev.error("load_failed")  # the reason names paths and models: the log keeps it
    else:
        event = ev.Error(code="loading", message=f"The assistant is still starting ({now.message}). "
                                                "It will connect by itself when it is ready.")
    await _turn_away(socket, event, encode)


async def _turn_away(socket: WebSocket, event: ev.Error, encode: Callable[[ev.Error], str]) -> None:
    """Say why in words, then close with 1013 (try again later) and the code as the reason."""
    await socket.send_text(encode(event))
    await socket.close(code=1013, reason=event.code)


def _realtime_error(event: ev.Error) -> str:
    return encode_realtime(error_event(event))


def create_app(
    settings: Settings,
    engines: Engines | None = None,
    *,
    fallback: bool = False,
    on_failure: Callable[[str], None] | None = None,
    pairing: Pairing | None = None,
    fingerprint: str | None = None,
) -> Litestar:
    """Wire the app. Unless `engines` is given (loaded already), the lifespan starts a thread that
    fetches, loads and warms up the models, so the port opens at once and /health says "loading"
    until they are ready; `fallback` allows the cpu preset when auto-picked gpu models cannot be had;
    `on_failure` gets the one-line reason when they cannot load at all. With `pairing` (`serve` gives one
    whenever the server listens beyond loopback) every browser and program must be paired or carry the
    token; `fingerprint` is the TLS certificate's, shown on the page."""
    loading = LoadStatus(LoadState("ready", "ready") if engines is not None else None)
    models = _models_lifespan(settings, engines, loading, fallback=fallback, on_failure=on_failure)
    hosts = access.served_hosts(settings.host, settings.access)
    state = {"settings": settings, "metrics": Metrics(), "loading": loading, "engines": engines,
             "pairing": pairing, "fingerprint": fingerprint, "refused_origins": set(),
             "clients": ClientSessions(settings.limits.max_sessions_per_client)}
    return Litestar(
        route_handlers=[*ROUTES, openai_audio_router(settings),
                        create_static_files_router(path="/static", directories=[ROOT / "static"])],
        lifespan=[models, _wyoming_lifespan],
        middleware=[DefineMiddleware(access.HostCheck, hosts=hosts)],
        before_send=[headers.security_headers, devices.renew_cookie],
        template_config=TemplateConfig(directory=ROOT / "templates", engine=JinjaTemplateEngine),
        # No OpenAPI pages: they would answer without pairing, and load scripts from CDNs into our origin.
        openapi_config=None,
        state=State(state),
    )


ROUTES = [index, health, status, qr_code, metrics, conversation, realtime, *PAIRING_ROUTES]


def _models_lifespan(
    settings: Settings,
    engines: Engines | None,
    loading: LoadStatus,
    *,
    fallback: bool,
    on_failure: Callable[[str], None] | None,
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """The app's lifespan: hand `engines` over at once, or load them on a thread while the port is open."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if engines is not None:
            _hand_over(app, settings, engines)
            yield
            return
        loader = BackgroundLoad(settings, loading, fallback=fallback, on_failure=on_failure,
                                on_ready=functools.partial(_hand_over, app))
        loader.start()
        try:
            yield
        finally:
            loader.close()

    return lifespan


@asynccontextmanager
async def _wyoming_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Home Assistant's Wyoming server (app/web/wyoming/server.py) on its own port, when wyoming.port is set: open
    while the app is, on the same loop and engines; it answers `describe` while the models load."""
    if not app.state.settings.wyoming.port:
        yield
        return
    server = WyomingServer(app.state)
    await server.start()
    try:
        yield
    finally:
        await server.stop()


def _hand_over(app: Litestar, settings: Settings, engines: Engines) -> None:
    """The loaded models (and their settings: the cpu preset's after a fallback) become the app's."""
    app.state.settings = settings
    app.state.engines = engines
    log.info("ready: preset %s, listening on %s:%d", settings.preset, settings.host, settings.port)
