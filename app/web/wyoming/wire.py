"""Wyoming's framing, read with bounds: a JSON header line (type, data, data_length, payload_length), then
data_length bytes of JSON data and payload_length bytes of payload. The wyoming package's own reader takes any
length a peer names; this one refuses what is larger than the server's frame limit."""

from __future__ import annotations

import asyncio
import json

from wyoming.event import Event

HEADER_BYTES = 64 * 1024  # the StreamReader's line limit (start_server's `limit`)


class BadFrame(Exception):
    """A peer's bytes are not a Wyoming event, or one larger than allowed: the connection ends."""


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """The next event; None at the end of the stream."""
    try:
        line = await reader.readline()
        if not line:
            return None
        header = json.loads(line)
        data_length, payload_length = int(header.get("data_length") or 0), int(header.get("payload_length") or 0)
        if not isinstance(header.get("type"), str) or not 0 <= data_length <= max_bytes \
                or not 0 <= payload_length <= max_bytes:
            raise BadFrame(f"header {line[:120]!r}")
        data = header.get("data") or {}
        if data_length:
            data.update(json.loads(await reader.readexactly(data_length)))
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    except (ValueError, TypeError, AttributeError) as exc:  # JSON, a line past the limit, data that is not an object
        raise BadFrame(str(exc)[:200]) from exc
    return Event(type=header["type"], data=data, payload=payload)
