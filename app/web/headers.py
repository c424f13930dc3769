"""Security headers on every HTTP response: no framing by other sites, only the page's own scripts, no
Referer that could carry the page's address (with a pairing token in it), and no cached copy of a page.

The page loads only its own files (templates/index.html: /static's scripts and style, htmx told not to
insert a style or evaluate code), so the policy can be strict: `script-src 'self'` with no inline code
and no eval. The page's WebSocket is named as well as 'self', for browsers whose 'self' does not cover
ws:/wss:. A policy on JSON, a script or an image changes nothing they do, so every response gets the
same headers (one rule, no list of content types to keep in step with the routes).
"""

from __future__ import annotations

import re

from litestar.datastructures import MutableScopeHeaders
from litestar.types import Message, Scope

from app.web.access import header

POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
          "connect-src 'self'{socket}; object-src 'none'; base-uri 'none'; form-action 'self'; "
          "frame-ancestors 'self'")
FIXED = {
    "x-frame-options": "SAMEORIGIN",  # frame-ancestors for browsers that predate it
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
NOT_STORED = ("text/html", "image/svg+xml")  # pages and fragments, and the QR code: may show the token
HOST = re.compile(r"[A-Za-z0-9.:\[\]-]+")  # a Host header that can go into the policy as it is


def policy(scope: Scope) -> str:
    """The Content-Security-Policy for this request: its own ws:// or wss:// address besides 'self'."""
    host = header(scope, "host")
    secure = scope.get("scheme") in ("https", "wss")
    socket = f" {'wss' if secure else 'ws'}://{host}" if HOST.fullmatch(host) else ""
    return POLICY.format(socket=socket)


async def security_headers(message: Message, scope: Scope) -> None:
    """App hook before each message (Litestar's before_send): adds the headers to a response's start."""
    if message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    headers["content-security-policy"] = policy(scope)
    for name, value in FIXED.items():
        headers[name] = value
    if headers.get("content-type", "").startswith(NOT_STORED) and "cache-control" not in headers:
        headers["cache-control"] = "no-store"
