"""What the settings and errors of a model on a server (llm_remote.py, speech_remote.py) may show: its address
without credentials, and its settings without the API key."""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec


def shown_url(url: str) -> str:
    """`url` as logs, errors and /health may show it: no user:password@, no query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}"


def repr_hiding_key(settings: msgspec.Struct) -> str:
    """A settings struct's repr with its `api_key` as *** (or empty): the key must never reach a log line or a
    traceback."""
    shown = {name: getattr(settings, name) for name in settings.__struct_fields__}
    shown["api_key"] = "***" if shown.get("api_key") else ""
    return f"{type(settings).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
