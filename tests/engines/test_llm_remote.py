"""The language model on an OpenAI-compatible server (backend openai): llama-cpp-python's own server on the
cpu preset's GGUF, started here, behind the real start-up, conversation and /ws: streamed replies,
barge-in closing the stream, a server that is not there, one that dies mid-reply, and the token estimate."""

from __future__ import annotations

import asyncio
import http.server
import json
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from app.config import Settings, load_settings
from app.engines.llm import DEFAULT_SYSTEM_PROMPT, LlmSettings
from app.engines.llm_remote import ChatRequest, LlmServerError, RemoteChatModel, estimate_tokens
from app.engines.loaded import Engines
from app.engines.tools import CallDelta, Tool, ToolSet
from app.startup import BackgroundLoad, cpu_fallback, load_and_warm
from app.web.server import create_app
from tests.llm_server import LlamaServer
from tests.support import JFK_TEXT, RecordingStatus, free_port, serving
from tests.web.test_server import events_until_turn_end, of_type, session

QUESTION = "What is the capital of France?"
STORY = "Tell me a long story about a brave little dragon and all of its friends."


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LlamaServer]:
    # A small context and short replies keep each test to seconds on two shared cores.
    with LlamaServer(api_key=secrets.token_hex(16), n_ctx=512) as server:
        yield server


@pytest.fixture(scope="module")
def remote_settings(llm_server: LlamaServer) -> Settings:
    # VA_LLM__BACKEND, __BASE_URL, __MODEL, __API_KEY and __N_CTX, as a deployment sets them
    return load_settings("cpu", environ={**llm_server.env(), "VA_LLM__MAX_TOKENS": "48"})


@pytest.fixture(scope="module")
def remote_engines(remote_settings: Settings) -> Iterator[Engines]:
    """The real start-up with backend openai; any attempt to load a GGUF here fails it."""
    import llama_cpp

    def no_local_model(*args, **kwargs):
        raise AssertionError("a local GGUF was loaded with backend openai")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp, "Llama", no_local_model)
        engines = load_and_warm(remote_settings)
    yield engines
    engines.close()


@pytest.fixture(scope="module")
def remote_app(remote_settings: Settings, remote_engines: Engines) -> Iterator[str]:
    with serving(create_app(remote_settings, remote_engines)) as url:
        yield url


def _tokens(server: LlamaServer, text: str) -> int:
    """What the server's own tokenizer makes of `text` (llama-cpp-python's /extras/tokenize/count)."""
    response = httpx.post(f"http://127.0.0.1:{server.port}/extras/tokenize/count", json={"input": text},
                          headers={"Authorization": f"Bearer {server.api_key}"}, timeout=10)
    return response.json()["count"]


def _wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------- settings and start-up


def test_the_environment_picks_the_backend_and_the_key_never_shows(remote_settings, llm_server):
    llm = remote_settings.llm
    assert (llm.backend, llm.base_url, llm.model) == ("openai", llm_server.base_url, llm_server.alias)
    assert llm.api_key == llm_server.api_key
    assert llm_server.api_key not in repr(remote_settings) and "api_key='***'" in repr(llm)
    with pytest.raises(ValueError, match="base_url"):
        LlmSettings(backend="openai")


def test_start_up_asks_the_server_and_health_names_it(remote_engines, remote_app, llm_server, app_log):
    assert isinstance(remote_engines.llm, RemoteChatModel)  # and no GGUF was loaded (the fixture)
    health = json.loads(urllib.request.urlopen(remote_app + "/health").read())
    assert health["status"] == "ok" and health["llm"] == llm_server.alias
    assert health["llm_backend"] == f"openai server {llm_server.base_url}"
    assert llm_server.api_key not in json.dumps(health)
    assert "GET /v1/models" in llm_server.output() and "POST /v1/chat/completions" in llm_server.output()


def test_start_up_fails_in_one_line_when_nothing_listens(remote_settings):
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    settings = msgspec.structs.replace(remote_settings, llm=msgspec.structs.replace(remote_settings.llm,
                                                                                     base_url=nowhere))
    status, reasons = RecordingStatus(), []
    loader = BackgroundLoad(settings, status, on_ready=lambda s, e: None, on_failure=reasons.append)
    loader.start()
    state = status.wait(30)
    assert state.phase == "failed" and reasons == [state.message]
    assert state.message == (f"the language model server {nowhere} cannot be reached (nothing listens there, "
                             "or the host is unknown): start it, or check llm.base_url (VA_LLM__BASE_URL)")
    assert settings.llm.api_key not in state.message
    # Asked before any model loads: a server that is down costs seconds, not a GPU load.
    assert [s.message for s in status.history if s.phase != "failed"] == ["checking the model files"]


def test_the_cpu_fallback_keeps_the_language_model_server(remote_settings):
    fallen = cpu_fallback(msgspec.structs.replace(remote_settings, preset="gpu"))
    assert fallen.preset == "cpu" and fallen.llm == remote_settings.llm  # no local GGUF swapped in


@pytest.mark.parametrize(("change", "said"), [
    ({"api_key": "wrong-key"}, "HTTP 401 (Invalid API key): it refused the API key; set llm.api_key"),
    ({"model": "no-such-model"}, "does not serve 'no-such-model' (it serves: smollm2-135m)"),
    ({"base_url": "root"}, "answered /models with HTTP 404 (Not Found): llm.base_url should be the API root"),
])
def test_a_wrong_key_model_or_address_is_one_line_in_words(remote_settings, llm_server, change, said):
    if change.get("base_url") == "root":
        change = {"base_url": llm_server.base_url.removesuffix("/v1")}
    with pytest.raises(LlmServerError) as error:
        RemoteChatModel.load(msgspec.structs.replace(remote_settings.llm, **change))
    message = str(error.value)
    assert said in message and "\n" not in message
    assert "wrong-key" not in message and llm_server.api_key not in message


# ---------------------------------------------------------------- replies through the conversation


def test_a_reply_streams_through_the_real_conversation(remote_app, llm_server):
    requests_before = llm_server.output().count("POST /v1/chat/completions")
    with session(remote_app, temperature=0.0) as ws:
        ws.send(json.dumps({"type": "text", "text": QUESTION}))
        events, audio = events_until_turn_end(ws)
    end = of_type(events, "turn_end")[0]
    assert end["reason"] == "completed" and not of_type(events, "error")
    assert len(of_type(events, "reply_text")) >= 2  # streamed piece by piece ("Paris" "."), not returned whole
    assert "paris" in end["reply"].lower() and len(audio) > 0
    assert llm_server.output().count("POST /v1/chat/completions") == requests_before + 1


def test_barge_in_closes_the_stream_and_the_server_stops(remote_app, llm_server):
    disconnects = llm_server.output().count("Disconnected from client")
    with session(remote_app) as ws:
        ws.send(json.dumps({"type": "text", "text": STORY}))
        interrupted = []

        def interrupt_on_first_text(event):
            if event["type"] == "reply_text" and not interrupted:
                ws.send(json.dumps({"type": "interrupt"}))
                interrupted.append(True)

        events, _ = events_until_turn_end(ws, on_event=interrupt_on_first_text)
        assert of_type(events, "turn_end")[0]["reason"] == "interrupted"
        # The server noticed the closed stream (it checks after each token) and stopped generating.
        assert _wait_for(lambda: llm_server.output().count("Disconnected from client") > disconnects)
        ws.send(json.dumps({"type": "text", "text": "Hi there."}))  # and the session goes on
        events, _ = events_until_turn_end(ws)
        assert of_type(events, "turn_end")[0]["reason"] == "completed"


def test_a_server_killed_mid_reply_fails_that_turn_and_the_next_works(remote_app, llm_server, app_log):
    with session(remote_app) as ws:
        ws.send(json.dumps({"type": "text", "text": STORY}))
        killed = []

        def kill_on_first_text(event):
            if event["type"] == "reply_text" and not killed:
                llm_server.kill()
                killed.append(True)

        try:
            events, _ = events_until_turn_end(ws, on_event=kill_on_first_text)
        finally:
            llm_server.start()  # again, on the same port: the next tests need it too
        assert killed and of_type(events, "turn_end")[0]["reason"] == "error"
        assert [e["code"] for e in of_type(events, "error")] == ["llm_failed"]
        assert "broke off the reply (the connection closed)" in app_log.text  # the log says it in words
        ws.send(json.dumps({"type": "text", "text": QUESTION}))
        events, audio = events_until_turn_end(ws)
        assert of_type(events, "turn_end")[0]["reason"] == "completed" and len(audio) > 0


# ---------------------------------------------------------------- counting tokens without the tokenizer


CONVERSATION = [
    DEFAULT_SYSTEM_PROMPT, JFK_TEXT, "Hello there, how are you today?", "Okay.", "Hi",
    "It costs 1,234 dollars and 56 cents, due on 2026-11-29 at 10:30.",
    "Bonjour, je m'appelle Ada et j'habite à Paris.", "Die Straße ist heute sehr nass, weil es geregnet hat.",
    "¿Dónde está la biblioteca? Está cerca de la estación.", "こんにちは、元気ですか？",
    "I am a small voice assistant 😀 and I speak clearly!", 'Hmm... well, "maybe" -- (or not)!',
]


def test_the_token_estimate_never_undercounts_conversation(llm_server):
    for text in CONVERSATION:
        real, guess = _tokens(llm_server, text), estimate_tokens(text)
        assert real <= guess, f"{text!r}: {guess} estimated, {real} real"
    english = " ".join(CONVERSATION[:4])
    assert estimate_tokens(english) <= 2.2 * _tokens(llm_server, english)  # and trims no earlier than needed


def test_trimmed_history_fits_the_servers_context(remote_engines):
    llm = remote_engines.llm
    history = []
    for i in range(5):
        history += [{"role": "user", "content": f"{i} " + "tell me more about the weather " * 14},
                    {"role": "assistant", "content": f"answer {i}"}]
    history += [{"role": "user", "content": "Is it sunny?"}, {"role": "assistant", "content": "Yes, it is."}]
    whole = [{"role": "system", "content": llm.settings.system_prompt}, *history, {"role": "user", "content": QUESTION}]
    with pytest.raises(LlmServerError, match="ended the stream before the reply was complete"):
        list(llm.stream_reply(whole))  # untrimmed, it is over the server's context
    messages = llm.build_messages(history, QUESTION)
    assert history == whole[-3:-1]  # the oldest went, the newest exchange stayed
    assert "paris" in "".join(llm.stream_reply(messages, temperature=0.0)).lower()


def test_the_blocking_stream_stops_on_cancel(remote_engines):
    cancel = threading.Event()
    pieces = []
    for piece in remote_engines.llm.stream_reply(remote_engines.llm.build_messages([], STORY), cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert len(pieces) == 3


# ---------------------------------------------------------------- function tools


WEATHER = Tool("get_weather", "The weather now in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIMER = Tool("set_timer", "Start a timer.", {
    "type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"]})


async def _collect(llm: RemoteChatModel, request: ChatRequest) -> list:
    return [piece async for piece in llm.write(request, temperature=0.0)]


def test_the_real_server_streams_a_named_call_as_deltas(remote_engines):
    # llama-cpp-python's server forces a named tool with a grammar of its schema and streams tool_calls;
    # "auto" and "required" it passes to the chat template only (SmolLM2's ignores them): it answers in words.
    # The wire is what is tested, not the prompt: after the preset's example exchanges, greedy SmolLM2-135M
    # put a control character into the city, which the server's JSON grammar let through (docs/replies.md).
    llm = RemoteChatModel(msgspec.structs.replace(remote_engines.llm.settings, example=()))
    tools = ToolSet((WEATHER, TIMER), "get_weather")
    request = llm.prompt(llm.build_messages([], "What's the weather in Paris?", tools=tools), tools)
    pieces = asyncio.run(_collect(llm, request))
    assert pieces and all(isinstance(piece, CallDelta) for piece in pieces)
    assert {(p.index, p.call_id, p.name) for p in pieces} == {(0, pieces[0].call_id, "get_weather")}
    assert pieces[0].call_id.startswith("call_")
    arguments = json.loads("".join(p.arguments for p in pieces))
    assert isinstance(arguments.get("city"), str)


class _ScriptedServer(http.server.ThreadingHTTPServer):
    """Answers every POST with `script` as server-sent events, and keeps the request bodies."""

    def __init__(self, script: list[dict]) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script, self.bodies = script, []


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in self.server.script:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


def _delta(**delta) -> dict:
    return {"choices": [{"index": 0, "delta": delta}]}


def _call(index: int, arguments: str, name: str | None = None) -> dict:
    function = {"arguments": arguments} | ({"name": name} if name else {})
    return _delta(tool_calls=[{"index": index, **({"id": f"srv-{index}", "type": "function"} if name else {}),
                               "function": function}])


# As OpenAI and vLLM stream them: the id and name once, then pieces of the arguments.
SCRIPT = [_delta(role="assistant", content="Let me check."), _call(0, "", "get_weather"), _call(0, '{"ci'),
          _call(0, 'ty": "Oslo"}'), _call(1, '{"minutes"', "set_timer"), _call(1, ": 5}"),
          {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]


def _served(script: list[dict], tools: ToolSet | None) -> tuple[dict, list]:
    """The body that RemoteChatModel.write sent for a user's "Hi" with `tools`, and what it made of `script`."""
    with _ScriptedServer(script) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            llm = RemoteChatModel(LlmSettings(backend="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                              model="m"))
            request = llm.prompt([{"role": "user", "content": "Hi"}], tools)
            pieces = asyncio.run(_collect(llm, request))
        finally:
            server.shutdown()
    [body] = server.bodies
    return body, pieces


@pytest.mark.parametrize(("choice", "sent"), [
    ("required", "required"), ("auto", "auto"), ("none", "none"),
    ("set_timer", {"type": "function", "function": {"name": "set_timer"}}),
])
def test_the_request_offers_the_tools_and_the_stream_becomes_calls(choice, sent):
    body, pieces = _served(SCRIPT, ToolSet((WEATHER, TIMER), choice))
    assert body["tool_choice"] == sent
    assert body["tools"] == [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": t.parameters}} for t in (WEATHER, TIMER)]
    assert pieces[0] == "Let me check."
    calls = [p for p in pieces if isinstance(p, CallDelta)]
    assert [(c.index, c.name) for c in calls] == [(0, "get_weather")] * 3 + [(1, "set_timer")] * 2
    assert len({c.call_id for c in calls[:3]}) == 1 and calls[0].call_id != calls[3].call_id
    assert all(c.call_id.startswith("call_") for c in calls)  # ids of our own, as the in-process model's
    assert json.loads("".join(c.arguments for c in calls[:3])) == {"city": "Oslo"}
    assert json.loads("".join(c.arguments for c in calls[3:])) == {"minutes": 5}


def test_without_tools_the_request_has_none_and_write_reply_sets_its_length():
    from app.core.pipeline import write_reply

    for tools in (None, ToolSet()):
        body, pieces = _served([_delta(content="Hello.")], tools)
        assert "tools" not in body and "tool_choice" not in body and pieces == ["Hello."]
        assert body["max_tokens"] == LlmSettings().max_tokens
    with _ScriptedServer([_delta(content="Hi.")]) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            llm = RemoteChatModel(LlmSettings(backend="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                              model="m"))

            async def written() -> list:
                request = llm.prompt([{"role": "user", "content": "Hi"}])
                return [piece async for piece in write_reply(llm, None, request, max_tokens=77)]

            assert asyncio.run(written()) == ["Hi."]
        finally:
            server.shutdown()
    assert server.bodies[0]["max_tokens"] == 77
