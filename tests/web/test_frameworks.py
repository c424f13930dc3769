"""Agent frameworks, installed from PyPI, driven against the live /v1/realtime (issue 28): openai-agents'
RealtimeAgent with a function tool over several turns, and pipecat's OpenAI realtime service in a pipeline.

The voice and the ears are the cpu preset's real Piper and Whisper. The language model is a scripted
OpenAI-compatible chat-completions server (ScriptedLlm, below) behind the `openai` backend: SmolLM2-135M
cannot be relied on to choose a tool, and a test of the wire must not depend on a model's whim. It calls
the weather tool when it is offered and asked about the weather, and otherwise answers in words that quote
the last tool result or the last user message, so every reply can be checked by what it says."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from app.audio import ASR_RATE, float_to_int16
from app.config import load_settings
from app.engines.llm_remote import RemoteChatModel
from app.engines.loaded import Engines
from app.web.realtime.protocol import RATE
from tests.support import resample, speak, words
from tests.web.test_ws import TIMEOUT, served

QUESTION = "What is the weather in Paris?"
TOOL_RESULT = "21 degrees and sunny"  # what the tool says; the spoken answer must carry it
THANKS = "Thank you. What should I wear?"
# Spoken in one breath: at the pause after a sentence the server's VAD may end the turn, and the rest of the
# speech then cuts the answer to the first part short (barge-in).
SPOKEN = "What should I wear today?"
MODEL = "scripted"


# ---------------------------------------------------------------- the scripted language model


class ScriptedLlm:
    """An OpenAI-compatible /v1 on a loopback port: /models lists one model; /chat/completions streams
    (SSE) a `get_weather` tool call when tools are offered and the last message is the user's and asks about
    the weather, else a text reply: the last tool result quoted when the last message is one, or the user's
    words. Every request body is kept in `requests`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def env(self) -> dict[str, str]:
        return {"VA_LLM__BACKEND": "openai", "VA_LLM__BASE_URL": self.base_url, "VA_LLM__MODEL": MODEL}

    def __enter__(self) -> ScriptedLlm:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # not a line per request in the test output
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self.send_error(404)
                    return
                self._send("application/json", json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                llm.requests.append(body)
                events = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in script(body))
                self._send("text/event-stream", events + b"data: [DONE]\n\n")

            def _send(self, kind: str, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def script(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of the streamed reply to one request."""
    last = body["messages"][-1]
    offered = [tool["function"]["name"] for tool in body.get("tools") or [] if tool.get("type") == "function"]
    if last["role"] == "user" and "weather" in text_of(last).lower() and "get_weather" in offered:
        call = {"index": 0, "id": f"call_{len(body['messages'])}", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}}
        pieces = ['{"city": ', '"Paris"}']
        return ([chunk({"role": "assistant", "tool_calls": [call]})]
                + [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
                + [chunk({}, finish="tool_calls")])
    if last["role"] == "tool":
        reply = f"The weather service says: {plain(text_of(last))}."
    else:
        reply = f"You said: {text_of(last)}"
    first, *rest = reply.split(" ")
    pieces = [first] + [" " + word for word in rest]  # word by word, as a model streams
    return ([chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
            + [chunk({}, finish="stop")])


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def plain(output: str) -> str:
    """A tool output as words: pipecat sends a result as JSON (a string in quotes)."""
    try:
        value = json.loads(output)
    except ValueError:
        return output
    return value if isinstance(value, str) else output


# ---------------------------------------------------------------- the assistant, on that model


@pytest.fixture(scope="module")
def scripted_llm() -> Iterator[ScriptedLlm]:
    with ScriptedLlm() as llm:
        yield llm


@pytest.fixture
def assistant(scripted_llm: ScriptedLlm, engines: Engines) -> Iterator[str]:
    """The app with backend openai on the scripted model, the cpu preset's real Whisper and Piper."""
    settings = load_settings("cpu", environ=scripted_llm.env())
    scripted_llm.requests.clear()
    with served(Engines(engines.asr, RemoteChatModel.load(settings.llm), engines.tts), settings) as url:
        yield url


def realtime_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/realtime"


def heard(engines: Engines, pcm16: bytes) -> list[str]:
    """What Whisper hears in a reply's 24 kHz voice, as words."""
    audio = np.frombuffer(pcm16, "<i2").astype(np.float32) / 32768
    return words(engines.asr.transcribe(resample(audio, RATE, ASR_RATE)))


# ---------------------------------------------------------------- openai-agents


class AgentsLog:
    """The events of one RealtimeSession, read from its iterator turn by turn."""

    def __init__(self, session: Any) -> None:
        self.events = session.__aiter__()
        self.tool_outputs: list[str] = []
        self.errors: list[Any] = []
        self.audio: dict[str, bytearray] = {}  # by item id
        self.responses: list[dict] = []  # the raw response.done events

    async def turn(self) -> None:
        """Read until the next response ends (agent_end)."""
        async for event in self.events:
            if event.type == "tool_end":
                self.tool_outputs.append(str(event.output))
            elif event.type == "error":
                self.errors.append(event.error)
            elif event.type == "audio":
                self.audio.setdefault(event.item_id, bytearray()).extend(event.audio.data)
            elif event.type == "raw_model_event" and event.data.type == "raw_server_event":
                if event.data.data.get("type") == "response.done":
                    self.responses.append(event.data.data["response"])
            elif event.type == "agent_end":
                return
        raise AssertionError(f"the session ended; errors: {self.errors}")


def spoken(response: dict) -> tuple[str, str] | None:
    """(item id, transcript) of a response's spoken message, if it has one."""
    for item in response.get("output", []):
        for part in item.get("content") or []:
            if item.get("type") == "message" and part.get("type") in ("output_audio", "audio"):
                return item["id"], part.get("transcript") or ""
    return None


async def agents_session(url: str, agent: Any) -> AgentsLog:
    from agents.realtime import RealtimeRunner

    config = {"url": f"{realtime_url(url)}?model=local", "api_key": "local",
              "initial_model_settings": {"model_name": "local"}}
    session = await RealtimeRunner(agent).run(model_config=config)
    async with session:
        log = AgentsLog(session)
        await session.send_message(QUESTION)
        await log.turn()
        # A response that called the tool: the SDK runs it (in a task of its own), sends its output and asks
        # for the next response, the spoken answer.
        if any(item.get("type") == "function_call" for item in log.responses[-1].get("output", [])):
            await log.turn()
        await session.send_message(THANKS)
        await log.turn()
    return log


def test_openai_agents_realtime_agent_calls_a_tool_and_speaks_its_result_over_several_turns(
        assistant, scripted_llm, engines):
    from agents import function_tool
    from agents.realtime import RealtimeAgent

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"{TOOL_RESULT} in {city}"

    agent = RealtimeAgent(name="Assistant", instructions="You are a helpful assistant.", tools=[get_weather])
    log = asyncio.run(asyncio.wait_for(agents_session(assistant, agent), 3 * TIMEOUT))
    assert calls == ["Paris"], f"the tool was not called as the model asked; server errors: {log.errors}"
    assert log.tool_outputs == [f"{TOOL_RESULT} in Paris"]
    # The model was offered the tool, and got its output back in the next request.
    assert "get_weather" in [t["function"]["name"] for t in scripted_llm.requests[0].get("tools", [])]
    tool_messages = [m for m in scripted_llm.requests[1]["messages"] if m["role"] == "tool"]
    assert [text_of(m) for m in tool_messages] == [f"{TOOL_RESULT} in Paris"]
    # Three responses: the call, the answer spoken from its result, the answer to the second turn.
    assert [r["status"] for r in log.responses] == ["completed"] * 3, log.responses
    answer, thanks = spoken(log.responses[1]), spoken(log.responses[2])
    assert answer is not None and TOOL_RESULT in answer[1], log.responses[1]
    assert {"21", "degrees"} <= set(heard(engines, bytes(log.audio[answer[0]])))
    assert thanks is not None and thanks[1] == f"You said: {THANKS}" and log.audio.get(thanks[0])
    assert not log.errors, log.errors


# ---------------------------------------------------------------- pipecat


def test_pipecat_realtime_service_in_a_pipeline_calls_a_function_and_replies_twice(
        assistant, scripted_llm, steady_voice, tmp_path):
    """pipecat runs in a child process (tests/web/pipecat_client.py): importing it patches asyncio.wait_for."""
    speech = np.concatenate([speak(steady_voice, SPOKEN, RATE), np.zeros(2 * RATE, np.float32)])
    (path := tmp_path / "speech.pcm").write_bytes(float_to_int16(speech).tobytes())
    out = subprocess.run([sys.executable, "-m", "tests.web.pipecat_client", realtime_url(assistant), str(path)],
                         capture_output=True, text=True, timeout=3 * TIMEOUT)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["failure"] is None and not report["errors"], (report, out.stderr[-3000:])
    assert report["tool_calls"] == [{"city": "Paris"}]
    replies = [r for r in report["replies"] if r["audio_bytes"]]
    assert len(replies) >= 2, report
    assert TOOL_RESULT in replies[0]["transcript"], report
    # The spoken question, heard and answered (tiny.en hears "wear" as "work" in some renditions).
    assert {"what", "should", "today"} <= set(words(replies[-1]["transcript"])), report
    assert scripted_llm.requests[-1]["messages"][-1]["role"] == "user"
