"""How the audio endpoints say no: OpenAI's error body ({"error": {message, type, param, code}}) with the HTTP
status OpenAI would use, in words; the details go to the log."""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException

log = logging.getLogger(__name__)

KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
         503: "server_error", 500: "server_error"}


class AudioError(Exception):
    """A request refused (4xx) or not done (5xx), with the words its client reads."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    kind = KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def refused(_: Request, exc: AudioError) -> Response:
    return Response(body(exc.status, exc.message, exc.code, exc.param), status_code=exc.status)


def http_refused(_: Request, exc: HTTPException) -> Response:
    """Litestar's own refusals on these routes (not paired, a request too large, a bad body) in OpenAI's shape."""
    words = {401: "Not paired: send the server's pairing token as the API key (Authorization: Bearer <token>).",
             403: "This page may not use the server (another origin).",
             413: "The request is too large (limits.max_upload_bytes)."}
    message = words.get(exc.status_code, "The request was not understood.")
    return Response(body(exc.status_code, message, None), status_code=exc.status_code, headers=exc.headers)


def crashed(request: Request, exc: Exception) -> Response:
    """Anything else: logged with its traceback; the client learns only that it failed."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return Response(body(500, "The server could not do that; its log says why.", "internal_error"), status_code=500)


HANDLERS = {AudioError: refused, HTTPException: http_refused, Exception: crashed}
