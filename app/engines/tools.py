"""Function tools a reply may call: what the client offers, and the calls as the model writes them."""

from __future__ import annotations

from typing import Any

import msgspec


class Tool(msgspec.Struct, frozen=True):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}  # JSON Schema of the arguments object ({}: any object)


class ToolSet(msgspec.Struct, frozen=True):
    tools: tuple[Tool, ...] = ()
    choice: str = "auto"  # "auto" | "none" | "required" | the name of one tool


class CallDelta(msgspec.Struct, frozen=True):
    """A piece of a function call as it is written; one call's `arguments` pieces join into its JSON."""

    index: int
    call_id: str
    name: str
    arguments: str
