"""The language model on an OpenAI-compatible server (vLLM, llama.cpp's server, SGLang, Ollama): replies
streamed from its /chat/completions over HTTP, behind the same interface as the in-process model (llm.py)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec

from app.engines.llm import ContextWindow, LlmSettings, Message
from app.engines.servers import shown_url
from app.engines.tools import CallDelta, ToolSet, new_call_id

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per reply in the server's log at info

CONNECT_TIMEOUT_S = 5.0  # a server that does not accept in 5 s is down or unreachable, not busy
QUOTED_CHARS = 200  # how much of a server's own error message goes into ours


class LlmServerError(RuntimeError):
    """The language model server cannot be used; the message says where, what happened and what to do,
    in words (never the API key)."""


class ChatRequest(msgspec.Struct, frozen=True):
    """A reply to write: the messages as they go to /chat/completions (the server applies the template), the
    tools it may call, and its length in tokens (None: the settings' max_tokens)."""

    messages: list[Message]
    tools: ToolSet | None = None
    max_tokens: int | None = None


def estimate_tokens(text: str) -> int:
    """A conservative count of `text`'s tokens without the server's tokenizer: ASCII letters and spaces
    at 2.5 a token, every other ASCII character (digits, punctuation) one each, and one per byte of a
    non-ASCII character.

    Measured against SmolLM2's small vocabulary (tests/test_llm_remote.py): English prose runs at ~4.2
    characters a token, so it is over-counted ~1.8x; French, German, Spanish, Japanese, numbers and
    emoji stay over too. Only strings of made-up words or bare digit runs can exceed it (SmolLM2 gives
    such text a token per character or two); larger vocabularies (Llama 3, Qwen) need fewer tokens still.
    Over-counting trims the history a little early instead of overflowing the server's context; counting
    here, not on the server, keeps build_messages free of network calls (it runs on the event loop).
    """
    ascii_chars = sum(c.isascii() for c in text)
    words = sum(c.isascii() and (c.isalpha() or c == " ") for c in text)
    return math.ceil(words / 2.5) + (ascii_chars - words) + (len(text.encode()) - ascii_chars)


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _CallPiece(msgspec.Struct):
    index: int = 0
    function: _FunctionDelta = msgspec.field(default_factory=_FunctionDelta)


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_CallPiece] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)


class _Chunk(msgspec.Struct):
    """One `data:` event of a streamed chat completion; unknown fields are ignored."""

    choices: list[_Choice] = []
    error: Any = None  # vLLM and others report a failure mid-stream this way


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class RemoteChatModel(ContextWindow):
    """A model served by an OpenAI-compatible server. Replies stream on the event loop (`write`): no
    local weights, no worker thread; the server schedules every session's replies itself. Leaving a
    reply early (barge-in: the task is cancelled) closes its HTTP stream, which tells the server to
    stop generating it."""

    asks_not_to_copy = True  # the server samples the tokens: no logits processor of ours reaches them

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        self.where = shown_url(settings.base_url)
        self._url = settings.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._tls = httpx.create_ssl_context()  # once: building one costs ~40 ms, too much per reply

    @classmethod
    def load(cls, settings: LlmSettings) -> RemoteChatModel:
        """Check that the server answers and serves `settings.model` (GET /models); no weights load here."""
        model = cls(settings)
        t0 = time.perf_counter()
        served = model.served_models()
        if settings.model not in served:
            raise LlmServerError(
                f"the language model server {model.where} does not serve '{settings.model}' (it serves: "
                f"{', '.join(served) or 'nothing'}): set llm.model (VA_LLM__MODEL) to the served name"
            )
        log.info("llm: backend openai, model %s on %s (answered in %.0f ms)",
                 settings.model, model.where, (time.perf_counter() - t0) * 1000)
        return model

    def describe(self) -> str:
        return f"openai server {self.where}"

    def served_models(self) -> list[str]:
        """The model names the server lists at /models (blocking: start-up only)."""
        try:
            with httpx.Client(**self._client_options()) as client:
                response = client.get(self._url + "/models")
                self._check(response, "/models")
                listing = response.json()
        except httpx.HTTPError as exc:
            raise LlmServerError(self._failure(exc) + ": start it, or check llm.base_url (VA_LLM__BASE_URL)") from exc
        except ValueError:  # not JSON
            listing = None
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise LlmServerError(f"the language model server {self.where} answered /models without a model list: "
                                 "llm.base_url should be the API root of an OpenAI-compatible server (ending in /v1)")
        return [str(entry.get("id", "")) for entry in listing["data"] if isinstance(entry, dict)]

    def prompt(self, messages: list[Message], tools: ToolSet | None = None) -> ChatRequest:
        return ChatRequest(messages, tools if tools is not None and tools.tools else None)

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def write(self, prompt: ChatRequest, temperature: float | None = None) -> AsyncIterator[str | CallDelta]:
        """The reply to `prompt`, piece by piece as the server streams it: text, and the pieces of the calls
        it makes (app/core/pipeline.py's write_reply calls this)."""
        body = self._body(prompt.messages, temperature, prompt)
        calls = _Calls()
        try:
            # A client per reply: its connection closes with the reply, and none is bound to an event loop
            # that may be gone (the TLS context is shared; a localhost connect costs well under 1 ms).
            async with httpx.AsyncClient(**self._client_options()) as client:
                async with client.stream("POST", self._url + "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        self._check(response, "/chat/completions")
                    async for line in response.aiter_lines():
                        pieces = self._pieces(line, calls)
                        if pieces is None:
                            return
                        for piece in pieces:
                            yield piece
                    raise self._cut_short()
        except httpx.HTTPError as exc:
            raise LlmServerError(self._failure(exc, mid_reply=True)) from exc

    def stream_reply(
        self,
        messages: list[Message],
        *,
        temperature: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """The same stream, blocking (warm-up, tools, tests); the server's sessions use `write`."""
        body = self._body(messages, temperature)
        calls = _Calls()  # none: no tools are offered here
        try:
            with httpx.Client(**self._client_options()) as client:
                with client.stream("POST", self._url + "/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        self._check(response, "/chat/completions")
                    for line in response.iter_lines():
                        pieces = self._pieces(line, calls)
                        if pieces is None or (cancel is not None and cancel.is_set()):
                            return
                        yield from (piece for piece in pieces if isinstance(piece, str))
                    raise self._cut_short()
        except httpx.HTTPError as exc:
            raise LlmServerError(self._failure(exc, mid_reply=True)) from exc

    def warm_up(self) -> None:
        # One short reply with the system prompt: the connection path is tried, and a server with a
        # prefix cache (llama.cpp's, vLLM's) holds the system prompt evaluated for the first real turn.
        for _ in self.stream_reply(self.build_messages([], "Hi")):
            break

    # ------------------------------------------------------------ the wire

    def _client_options(self) -> dict[str, Any]:
        timeout = httpx.Timeout(self.settings.timeout_s, connect=min(self.settings.timeout_s, CONNECT_TIMEOUT_S))
        return {"headers": self._headers, "timeout": timeout, "verify": self._tls}

    def _body(
        self, messages: list[Message], temperature: float | None, request: ChatRequest | None = None
    ) -> dict[str, Any]:
        s = self.settings
        max_tokens = request.max_tokens if request is not None and request.max_tokens is not None else s.max_tokens
        body: dict[str, Any] = {
            "model": s.model,
            "messages": messages,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": s.temperature if temperature is None else temperature,
            "top_p": s.top_p,
        }
        if s.repeat_penalty != 1.0:
            # Not in OpenAI's API, and small models loop without it: llama.cpp's servers read the first
            # name, vLLM and SGLang the second, and each ignores the other's.
            body["repeat_penalty"] = body["repetition_penalty"] = s.repeat_penalty
        if request is not None and request.tools is not None:
            body["tools"] = [tool.as_openai() for tool in request.tools.tools]
            body["tool_choice"] = request.tools.wire_choice()
        return body

    def _pieces(self, line: str, calls: _Calls) -> list[str | CallDelta] | None:
        """The reply text and call pieces in one line of the event stream; [] for any other line; None at
        its end."""
        if not line.startswith("data:"):
            return []  # blank separators, `: ping` comments, `event:` names
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        try:
            chunk = _decode_chunk(data)
        except msgspec.MsgspecError as exc:
            raise LlmServerError(f"the language model server {self.where} streamed something that is not "
                                 "a chat completion") from exc
        if chunk.error is not None:
            raise LlmServerError(f"the language model server {self.where} stopped the reply: "
                                 f"{self._quote(chunk.error)}")
        pieces: list[str | CallDelta] = []
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            pieces += calls.read(choice.delta.tool_calls or ())
        return pieces

    def _check(self, response: httpx.Response, path: str) -> None:
        """A status other than 200 as a LlmServerError, with the server's own reason quoted."""
        code = response.status_code
        if code == 200:
            return
        if code in (401, 403):
            hint = ": it refused the API key; set llm.api_key (VA_LLM__API_KEY)"
        elif code == 404 and path == "/models":
            hint = ": llm.base_url should be the API root, ending in /v1"
        else:
            hint = ""
        reason = self._quote(_error_text(response))
        raise LlmServerError(f"the language model server {self.where} answered {path} with HTTP {code}"
                             f"{f' ({reason})' if reason else ''}{hint}")

    def _cut_short(self) -> LlmServerError:
        # Every OpenAI-compatible server ends a whole reply with [DONE]; without it the server failed
        # (llama-cpp-python's, on a prompt over its context, ends the stream empty) or a proxy cut it.
        return LlmServerError(f"the language model server {self.where} ended the stream before the reply "
                              "was complete")

    def _failure(self, exc: httpx.HTTPError, mid_reply: bool = False) -> str:
        if isinstance(exc, httpx.TimeoutException):
            what = f"did not answer within {self.settings.timeout_s:g} s (llm.timeout_s)"
        elif isinstance(exc, httpx.ConnectError):
            what = "cannot be reached (nothing listens there, or the host is unknown)"
        elif mid_reply:
            what = "broke off the reply (the connection closed)"
        else:
            what = "broke off the connection"
        return f"the language model server {self.where} {what}"

    def _quote(self, value: Any) -> str:
        """A server's error message, short, on one line, and never with our API key in it."""
        if isinstance(value, dict):
            value = value.get("message", value)
        text = " ".join(str(value).split())[:QUOTED_CHARS]
        return text.replace(self.settings.api_key, "***") if self.settings.api_key else text


class _Calls:
    """The calls of one streamed reply: each index's name (sent once, in its first piece, by OpenAI and vLLM;
    in every piece by llama-cpp-python) and an id of our own, "call_" + hex as the in-process model's: the
    server never needs its own back, since the history we send it holds ours."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[str, str]] = {}  # index -> (call_id, name)
        self._held: dict[int, str] = {}  # arguments that came before their call's name

    def read(self, pieces: list[_CallPiece] | tuple[()]) -> list[CallDelta]:
        out = []
        for piece in pieces:
            arguments = self._held.pop(piece.index, "") + (piece.function.arguments or "")
            if piece.index not in self._known:
                if not piece.function.name:
                    self._held[piece.index] = arguments
                    continue
                self._known[piece.index] = (new_call_id(), piece.function.name)
            elif not arguments:
                continue
            call_id, name = self._known[piece.index]
            out.append(CallDelta(piece.index, call_id, name, arguments))
        return out


def _error_text(response: httpx.Response) -> Any:
    """The reason in an error response: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or text."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        return body.get("error") or body.get("detail") or body.get("message") or ""
    return body

