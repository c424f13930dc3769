"""Who may use the server: the Host check, same-origin WebSockets and forms, and pairing.

- Host: a request must name this server as loopback, the address it serves, or a configured name. A web
  page elsewhere cannot then reach it through a DNS name it points at 127.0.0.1 (DNS rebinding).
- Origin: a browser always says which page opens a WebSocket or posts a form; /ws and the device routes
  take only this server's own page (or a configured origin). Programs send no Origin at all, and a page
  cannot hide its own, so a request without one is let through: a foreign page can never get there
  without it.
- Pairing (whenever the server listens beyond loopback): the log's link and QR code carry a secret
  token; opening it pairs the browser as a device of its own (devices.py: a cookie with the device's id,
  never the token), and programs send `Authorization: Bearer <token>`. A client on this computer
  (loopback) is trusted like a paired device unless access.trust_loopback is off. On a server bound to
  loopback there is no token at all.
"""

from __future__ import annotations

import logging
import re
import secrets
from urllib.parse import urlsplit

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send

from app.web import devices, lan
from app.web.devices import Pairing
from app.web.lan import ALL_INTERFACES, LOOPBACK_NAMES

log = logging.getLogger(__name__)
TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"]*", re.IGNORECASE)


class AccessSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Names and pages to trust besides the defaults. From the environment, comma-separated:
    VA_ACCESS__ALLOWED_HOSTS=assistant.home.arpa,10.0.0.7"""

    allowed_hosts: tuple[str, ...] | str = ()  # Host names besides loopback and the served address
    allowed_origins: tuple[str, ...] | str = ()  # pages besides the server's own that may open /ws
    # A client on this computer (127.0.0.1, ::1) counts as paired: the computer's own browser needs no
    # pairing and shows the QR code for phones. Off behind a reverse proxy on the same machine, whose
    # requests all come from loopback: VA_ACCESS__TRUST_LOOPBACK=false.
    trust_loopback: bool = True

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
        if scope["type"] not in ("http", "websocket") or host_name(header(scope, "host")) in self.hosts:
            await self.app(scope, receive, send)
            return
        log.debug("refused a request for host %r", header(scope, "host"))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "host not allowed"})
            return
        body = b"This server does not answer to that host name.\n"
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: str) -> str:
    """A request's header by its lower-case name, from the ASGI scope ("" when absent)."""
    wanted = name.encode()
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == wanted), "")


def same_origin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of /ws and of the forms: a browser page may use them only from this server's own origin or
    an allowed one."""
    origin = connection.headers.get("origin")
    if origin is None:
        return  # not a browser: programs send none (and beyond loopback they still need the token)
    secure = connection.scope["scheme"] in ("https", "wss")
    own = _origin(f"{'https' if secure else 'http'}://{connection.headers.get('host', '')}")
    state = connection.app.state
    if _origin(origin) in (own, *state.settings.access.allowed_origins) and own:
        return
    kind = "WebSocket" if connection.scope["type"] == "websocket" else "request"
    refused: set[str] = state.refused_origins
    if origin not in refused and len(refused) < 100:  # once per origin: a page retrying cannot flood the log
        refused.add(origin)
        log.warning("refused a %s from the page at %s (not this server's; see access.allowed_origins)",
                    kind, origin)
    raise PermissionDeniedException(f"cross-origin {kind}")


def paired(connection: ASGIConnection) -> bool:
    """Whether the request may use the server: no pairing (loopback server), a client on this computer
    (access.trust_loopback), the token as a bearer token, or a paired device's cookie. A device's cookie
    due a renewal is marked for the response (devices.renew_cookie)."""
    pairing: Pairing | None = connection.app.state.pairing
    if pairing is None or (connection.app.state.settings.access.trust_loopback and from_loopback(connection)):
        return True
    bearer = _bearer(connection)
    if bearer is not None and same_secret(bearer, pairing.token):  # the token only: a device id is a cookie's
        return True
    device_id = connection.cookies.get(devices.COOKIE)
    device = pairing.devices.find(device_id)
    if device is None or device_id is None:
        return False
    if connection.scope["type"] == "http" and pairing.devices.renew(device):  # a socket's answer sets no cookie
        renewal = devices.device_cookie(device_id).to_header(header="")
        connection.scope[devices.RENEWAL] = renewal
    return True


def _bearer(connection: ASGIConnection) -> str | None:
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def from_loopback(connection: ASGIConnection) -> bool:
    """Whether the client's socket is on this computer (not its Host header: that is the client's to say)."""
    client = connection.client
    return client is not None and lan.is_loopback(client.host.removeprefix("::ffff:"))


def same_secret(given: str, token: str) -> bool:
    """Compared in constant time, so the answer's timing tells nothing about the token."""
    return secrets.compare_digest(given.encode(), token.encode())


def require_pairing(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of every route that shows or does something: 401 (403 for /ws) until paired."""
    if not paired(connection):
        if connection.scope["type"] == "websocket":
            raise PermissionDeniedException("not paired")
        raise NotAuthorizedException("not paired: open the link from the server log, or send the bearer token")


class HideTokens(logging.Filter):
    """On uvicorn's access log: a request's `?token=` (a pairing link, opened or guessed) is written as
    `token=[hidden]`, so the log never holds the secret that pairs a device."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(TOKEN_IN_URL.sub(r"\1[hidden]", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = TOKEN_IN_URL.sub(r"\1[hidden]", record.msg)
        return True


def hide_tokens_in_access_log() -> None:
    """Install HideTokens on uvicorn's access logger (after uvicorn configured its logging: `serve` does)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, HideTokens) for f in logger.filters):
        logger.addFilter(HideTokens())
