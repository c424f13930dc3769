"""Function tools for the language model: what a reply may call, the grammar that forces a well-formed call,
and the reader that splits a model's raw output into speakable text and the calls it writes."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import msgspec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"  # the Hermes/Qwen call format; see describe()
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI allows as a function's name
CHOICES = ("auto", "none", "required")
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.x templates call them "parameters"


class Tool(msgspec.Struct, frozen=True):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}  # JSON Schema of the arguments object ({} = any object)

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")

    def schema(self) -> dict[str, Any]:
        """The arguments' schema, always of an object."""
        return self.parameters or {"type": "object"}

    def as_openai(self) -> dict[str, Any]:
        """The tool as the chat completions API and Hugging Face chat templates take it."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.schema()}}


class ToolSet(msgspec.Struct, frozen=True):
    tools: tuple[Tool, ...] = ()
    choice: str = "auto"  # "auto" | "none" | "required" | the name of one tool

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tool names must differ")
        if self.choice not in CHOICES and self.choice not in names:
            raise ValueError(f"tool_choice {self.choice!r} must be auto, none, required or a tool's name")

    def offered(self) -> tuple[Tool, ...]:
        """The tools the model may call in this reply: none for "none", the one named, or all."""
        if self.choice == "none":
            return ()
        if self.choice in CHOICES:
            return self.tools
        return tuple(tool for tool in self.tools if tool.name == self.choice)

    def forced(self) -> bool:
        """Whether the reply must be exactly one call ("required" or a named tool)."""
        return self.choice != "auto" and bool(self.offered())

    def wire_choice(self) -> str | dict[str, Any]:
        """tool_choice as the chat completions API takes it."""
        if self.choice in CHOICES:
            return self.choice
        return {"type": "function", "function": {"name": self.choice}}


class CallDelta(msgspec.Struct, frozen=True):
    """A piece of a function call as it is written; the `arguments` of one call's deltas, joined, are the
    complete JSON object text of its arguments."""

    index: int  # 0 for the reply's first call, 1 for a second...
    call_id: str  # "call_" + random hex, the same on every delta of one call
    name: str
    arguments: str  # the next piece of the call's arguments JSON text ("" allowed)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def describe(tools: ToolSet) -> str:
    """The offered tools in plain words, with the exact format of a call: for the system message of a model
    whose chat template knows no tools. The format is the one the grammar forces and ToolReader reads."""
    lines = ["", "", "You can call these tools:"]
    for tool in tools.offered():
        about = f": {tool.description}" if tool.description else ""
        lines.append(f"- {tool.name}{about} Its arguments follow this JSON Schema: {json.dumps(tool.schema())}")
    lines.append(f'To call a tool, answer with only {CALL_OPEN}{{"name": "<tool name>", "arguments": '
                 f"{{<the arguments>}}}}{CALL_CLOSE}. Otherwise answer in words.")
    if tools.choice == "required":
        lines[-1] = lines[-1].removesuffix(" Otherwise answer in words.") + " Call one tool now."
    elif tools.forced():
        lines[-1] = lines[-1].removesuffix(" Otherwise answer in words.") + f" Call {tools.choice} now."
    return "\n".join(lines)


# JSON forbids control characters inside strings; llama-cpp-python's converter lets them through.
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def call_grammar(tools: ToolSet) -> str:
    """GBNF for exactly one call among the offered tools, `<tool_call>{"name": N, "arguments": {...}}</tool_call>`,
    whose arguments match the tool's schema. llama-cpp-python's converter reads type (string, integer, number,
    boolean, null, array, object), properties, required, additionalProperties (absent = no others), enum,
    const, anyOf/oneOf, allOf, $ref, pattern, minLength/maxLength, minItems/maxItems and string formats;
    it ignores minimum/maximum and raises on a type it does not know."""
    from llama_cpp.llama_grammar import SchemaConverter

    calls = [{"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.schema()},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in tools.offered()]
    if not calls:
        raise ValueError("a grammar needs at least one offered tool")
    converter = SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False,
                                raw_pattern=False)
    schema = converter.resolve_refs({"anyOf": calls} if len(calls) > 1 else calls[0], "tools")
    converter.visit(schema, "call")
    rules = [line for line in converter.format_grammar().splitlines() if not line.startswith("char ::= ")]
    if any(re.search(r"\bchar\b", line) for line in rules):
        rules.append(_STRICT_CHAR)
    return "\n".join([f'root ::= "{CALL_OPEN}" call "{CALL_CLOSE}"', *rules])


class ToolReader:
    """Splits a model's raw output into speakable text (str) and the calls it writes (CallDelta).

    Text passes through at once; only a tail that could still be the start of `<tool_call>` is held back
    until it is told apart (and, before any text, a reply that starts with `{`, the bare call that Llama 3.x
    templates ask for). A call's arguments stream out as they are written, once its name is known. A call
    that is malformed (not a JSON object with an offered tool's name and an object of arguments, or cut
    off by the end of the reply) raises ValueError, also under "auto": it cannot be spoken (it is JSON, not
    words), and its first deltas may already have gone out. With no tools offered, everything is text.
    """

    def __init__(self, tools: ToolSet | None) -> None:
        self._names = {tool.name for tool in tools.offered()} if tools is not None else set()
        self._pending = ""  # raw text not yet told apart
        self._spoken = False  # words went out already: a `{` is then text, not a call
        self._call: _CallScan | None = None
        self._closing = False  # after a call's JSON, before its `</tool_call>`
        self._calls = 0
        self._after_call = False  # only whitespace since the last call's end: not spoken

    def feed(self, piece: str) -> list[str | CallDelta]:
        if not self._names:
            return [piece] if piece else []
        self._pending += piece
        return self._drain(final=False)

    def finish(self) -> list[str | CallDelta]:
        """What is left at the end of the reply; raises ValueError if a call was left unfinished."""
        if not self._names:
            return []
        out = self._drain(final=True)
        if self._call is not None:
            raise ValueError(f"the reply ended inside a tool call: {self._call.text()[:200]!r}")
        return out

    def _drain(self, final: bool) -> list[str | CallDelta]:
        out: list[str | CallDelta] = []
        while self._pending:
            if self._call is not None:
                deltas, self._pending = self._call.feed(self._pending)
                out += deltas
                if not self._call.done:
                    break
                self._call, self._closing, self._calls = None, True, self._calls + 1
            elif self._closing:
                if not self._close(final):
                    break
            elif not self._text(out, final):
                break
        return out

    def _close(self, final: bool) -> bool:
        """Skip the `</tool_call>` after a call (tolerated if missing); False while it may still come."""
        rest = self._pending.lstrip()
        if rest.startswith(CALL_CLOSE):
            rest = rest[len(CALL_CLOSE):]
        elif CALL_CLOSE.startswith(rest) and not final:
            return False
        self._pending, self._closing, self._after_call = rest.lstrip(), False, True
        return True

    def _text(self, out: list[str | CallDelta], final: bool) -> bool:
        """Pass text on up to a call's start; False when the rest must wait for more."""
        pending = self._pending
        if not self._spoken and self._calls == 0 and pending.lstrip().startswith("{"):
            self._start_call(pending.lstrip())
            return True
        at = pending.find(CALL_OPEN)
        if at >= 0:
            self._say(out, pending[:at])
            self._start_call(pending[at + len(CALL_OPEN):])
            return True
        held = 0 if final else _held_back(pending, self._spoken or self._calls > 0)
        self._say(out, pending[: len(pending) - held])
        self._pending = pending[len(pending) - held:]
        return False

    def _say(self, out: list[str | CallDelta], text: str) -> None:
        if text.strip() or (text and self._spoken and not self._after_call):
            out.append(text)
            self._spoken, self._after_call = True, False

    def _start_call(self, body: str) -> None:
        self._call = _CallScan(self._calls, self._names)
        self._pending = body


def _held_back(text: str, spoken: bool) -> int:
    """How many characters at the end of `text` could still begin a call: a proper prefix of `<tool_call>`,
    or, before any words, leading whitespace (a `{` may follow)."""
    if not spoken and not text.strip():
        return len(text)
    for size in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0


class _CallScan:
    """One call's JSON object, scanned a character at a time as it is written: the top-level keys, the name,
    and where the arguments object starts and ends, so that its text streams out while it is written."""

    def __init__(self, index: int, names: set[str]) -> None:
        self.index, self.names, self.call_id = index, names, new_call_id()
        self.done = False
        self._body, self._pos = "", 0
        self._depth, self._in_string, self._escape, self._after_colon = 0, False, False, False
        self._string_at: int | None = None
        self._key: str | None = None
        self._name: str | None = None
        self._args: list[int | None] = [None, None]  # [start, end) of the arguments object's text
        self._sent = -1  # the end of the arguments text sent; -1: nothing sent yet, not even the name

    def text(self) -> str:
        return self._body

    def feed(self, text: str) -> tuple[list[CallDelta], str]:
        """The deltas that `text` completes, and what follows the call's JSON object (empty until it ends)."""
        self._body += text
        end = self._scan()
        deltas = self._deltas()
        if end is None:
            return deltas, ""
        self.done = True
        deltas += self._check(self._body[: end + 1])
        return deltas, self._body[end + 1:]

    def _scan(self) -> int | None:
        body = self._body
        for i in range(self._pos, len(body)):
            c = body[i]
            self._pos = i + 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                    self._string_ends(i)
            elif self._depth == 0:
                if c == "{":
                    self._depth = 1
                elif not c.isspace():
                    raise ValueError(f"the model wrote a malformed tool call: {body[:200]!r}")
            elif c == '"':
                self._in_string, self._string_at = True, i if self._depth == 1 else None
            elif c in "{[":
                if self._depth == 1 and self._after_colon and c == "{" and self._key in ARGUMENT_KEYS:
                    self._args = [i, None]
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 1 and self._args[0] is not None and self._args[1] is None:
                    self._args[1] = i + 1
                if self._depth == 0:
                    return i
            elif self._depth == 1 and c in ":,":
                self._after_colon = c == ":"
        return None

    def _string_ends(self, i: int) -> None:
        if self._string_at is None:
            return
        value = json.loads(self._body[self._string_at: i + 1])
        if not self._after_colon:
            self._key = value
        elif self._key == "name":
            if value not in self.names:
                raise ValueError(f"the model called {value!r}, which is not an offered tool")
            self._name = value

    def _deltas(self) -> list[CallDelta]:
        if self._name is None:
            return []
        start, end = self._args
        if start is None:
            available = max(self._sent, 0)
        else:
            available = end if end is not None else self._pos
        piece = self._body[max(self._sent, start or 0): available] if start is not None else ""
        if self._sent >= 0 and not piece:
            return []
        self._sent = available if start is not None else 0
        return [CallDelta(self.index, self.call_id, self._name, piece)]

    def _check(self, text: str) -> list[CallDelta]:
        """Validate the whole call; the arguments as one delta if they were not an object streamed as written
        (missing: {}; a JSON string of an object, as OpenAI's own API writes them)."""
        try:
            call = json.loads(text)
            if not isinstance(call, dict):
                raise TypeError("not an object")
            arguments = next((call[key] for key in ARGUMENT_KEYS if key in call), {})
            if isinstance(arguments, str) and self._args[0] is None:
                arguments = json.loads(arguments)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the model wrote a malformed tool call: {text[:200]!r}") from exc
        if not isinstance(call.get("name"), str) or self._name is None or not isinstance(arguments, dict):
            raise ValueError(f"the model wrote a malformed tool call: {text[:200]!r}")
        if self._args[0] is not None:
            return []
        return [CallDelta(self.index, self.call_id, self._name, json.dumps(arguments))]
