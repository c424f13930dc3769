"""Who may use the server: the Host check, same-origin WebSockets, and the pairing token of `--lan`.

- Host: a request must name this server as loopback, the address it serves, or a configured name. A web
  page elsewhere cannot then reach it through a DNS name it points at 127.0.0.1 (DNS rebinding).
- Origin: a browser always says which page opens a WebSocket; /ws takes only this server's own page
  (or a configured origin). Programs send no Origin at all, and a page cannot hide its own, so a
  WebSocket without one is let through: a foreign page can never get there without it.
- Pairing (`--lan` only): the log's link and QR code carry a secret token; opening it leaves an
  HttpOnly cookie, and programs send `Authorization: Bearer <token>`. On loopback there is no token.
"""

from __future__ import annotations

import logging
import secrets
from urllib.parse import urlsplit

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from app.web import lan
from app.web.lan import ALL_INTERFACES, LOOPBACK_NAMES

log = logging.getLogger(__name__)

COOKIE = "va_pairing"
COOKIE_DAYS = 400  # the longest lifetime browsers keep a cookie: a phone stays paired


class AccessSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Names and pages to trust besides the defaults. From the environment, comma-separated:
    VA_ACCESS__ALLOWED_HOSTS=assistant.home.arpa,10.0.0.7"""

    allowed_hosts: tuple[str, ...] | str = ()  # Host names besides loopback and the served address
    allowed_origins: tuple[str, ...] | str = ()  # pages besides the server's own that may open /ws

    def __post_init__(self) -> None:
        hosts = tuple(host_name(h) for h in _listed(self.allowed_hosts))
        origins = tuple(_origin(o) for o in _listed(self.allowed_origins))
        if "" in origins:
            raise ValueError("allowed_origins: each is scheme://host[:port], e.g. https://assistant.home.arpa:8000")
        msgspec.structs.force_setattr(self, "allowed_hosts", hosts)
        msgspec.structs.force_setattr(self, "allowed_origins", origins)


def _listed(value: tuple[str, ...] | str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]


def host_name(host: str) -> str:
    """A Host header (or a configured name) without its port and IPv6 brackets, lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin(url: str) -> str:
    """scheme://host:port with the default port written out, so that equal origins compare equal;
    "" for what is not an http(s) origin (`null`, a file: page)."""
    parts = urlsplit(url.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def served_hosts(bind: str, access: AccessSettings, lan_address: str | None = None) -> frozenset[str]:
    """The Host names this server answers to: loopback, the address it is bound to (the LAN address
    when bound to every interface), and the configured ones."""
    hosts = {host_name(n) for n in LOOPBACK_NAMES} | set(access.allowed_hosts)
    if bind in (ALL_INTERFACES, "::", ""):
        hosts.add(lan_address or lan.lan_ip())
    else:
        hosts.add(host_name(bind))
    return frozenset(hosts)


class HostCheck:
    """ASGI middleware: refuse any request whose Host is not one of `hosts` (400 for HTTP; a WebSocket
    is closed before its handshake completes, which the server answers with 403).

    Not Litestar's AllowedHostsConfig: it matches the Host header with its port, so "127.0.0.1"
    would refuse "127.0.0.1:8000", and it answers a WebSocket with an HTTP response it cannot send."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or host_name(_header(scope, "host")) in self.hosts:
            await self.app(scope, receive, send)
            return
        log.debug("refused a request for host %r", _header(scope, "host"))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
            return
        body = b"This server does not answer to that host name.\n"
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: str) -> str:
    wanted = name.encode()
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == wanted), "")


def same_origin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of /ws: a browser page may open it only from this server's own origin or an allowed one."""
    origin = connection.headers.get("origin")
    if origin is None:
        return  # not a browser: programs send none (and with --lan they still need the token)
    secure = connection.scope["scheme"] in ("https", "wss")
    own = _origin(f"{'https' if secure else 'http'}://{connection.headers.get('host', '')}")
    state = connection.app.state
    if _origin(origin) in (own, *state.settings.access.allowed_origins) and own:
        return
    refused: set[str] = state.refused_origins
    if origin not in refused and len(refused) < 100:  # once per origin: a page retrying cannot flood the log
        refused.add(origin)
        log.warning("refused a WebSocket from the page at %s (not this server's; see access.allowed_origins)",
                    origin)
    raise PermissionDeniedException("cross-origin WebSocket")


def paired(connection: ASGIConnection) -> bool:
    """Whether the request carries the pairing token (cookie or bearer); always true without one."""
    token: str | None = connection.app.state.token
    if token is None:
        return True
    given = [connection.cookies.get(COOKIE, "")]
    scheme, _, bearer = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given.append(bearer.strip())
    return any(same_secret(g, token) for g in given)


def same_secret(given: str, token: str) -> bool:
    """Compared in constant time, so the answer's timing tells nothing about the token."""
    return secrets.compare_digest(given.encode(), token.encode())


def require_pairing(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of every route that shows or does something: 401 (403 for /ws) until paired."""
    if not paired(connection):
        if connection.scope["type"] == "websocket":
            raise PermissionDeniedException("not paired")
        raise NotAuthorizedException("not paired: open the link from the server log, or send the bearer token")
