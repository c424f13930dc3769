"""pipecat's OpenAI realtime service in a pipeline, pointed at our /v1/realtime: run in a child process by
tests/web/test_frameworks.py, because importing pipecat patches asyncio.wait_for process-wide.

    python -m tests.web.pipecat_client ws://127.0.0.1:PORT/v1/realtime SPEECH.pcm

Turn one is the context's own user message (a question that needs the weather tool); pipecat runs the tool
with the handler registered here and sends its result back. Turn two is SPEECH (PCM16, 24 kHz, mono) sent
as a microphone sends it, answered through the server's VAD. The last line of stdout is a JSON report:
each reply's transcript and audio length, the tool calls, and any error pipecat raised."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMRunFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner

QUESTION = "What is the weather in Paris?"
TOOL_RESULT = "21 degrees and sunny"
RATE = 24_000
CHUNK = RATE * 2 // 10  # 100 ms of PCM16
TURN_TIMEOUT = 180  # seconds for one reply on two shared cores


class Record:
    """What came out of the pipeline, reply by reply (a reply ends at each response.done)."""

    def __init__(self) -> None:
        self.replies: list[dict] = [{"transcript": "", "audio_bytes": 0}]
        self.errors: list[str] = []
        self.tool_calls: list[dict] = []

    def see(self, frame: Frame) -> None:
        current = self.replies[-1]
        if isinstance(frame, TTSTextFrame):
            current["transcript"] += frame.text
        elif isinstance(frame, TTSAudioRawFrame):
            current["audio_bytes"] += len(frame.audio)
        elif isinstance(frame, LLMFullResponseEndFrame):
            self.replies.append({"transcript": "", "audio_bytes": 0})
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame.error)

    def done(self) -> list[dict]:
        return self.replies[:-1]

    def spoken(self) -> list[dict]:
        return [reply for reply in self.done() if reply["audio_bytes"]]


class Tap(FrameProcessor):
    """Passes every frame on, and records those going its way (errors travel upstream)."""

    def __init__(self, record: Record, direction: FrameDirection) -> None:
        super().__init__()
        self.record, self.direction = record, direction

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.record.see(frame)
        await self.push_frame(frame, direction)


async def until(record: Record, spoken: int) -> None:
    """Until `spoken` replies with audio are done; fails at once on an error (pipecat's are fatal)."""
    deadline = time.monotonic() + TURN_TIMEOUT
    while len(record.spoken()) < spoken:
        if record.errors:
            raise RuntimeError(f"pipecat reported an error: {record.errors[0]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(record.spoken())} of {spoken} spoken replies after {TURN_TIMEOUT} s")
        await asyncio.sleep(0.05)


def build(url: str, record: Record) -> Pipeline:
    weather = FunctionSchema(name="get_weather", description="The current weather in a city.",
                             properties={"city": {"type": "string", "description": "The city"}},
                             required=["city"])
    context = LLMContext(messages=[{"role": "user", "content": QUESTION}], tools=ToolsSchema([weather]))
    pair = LLMContextAggregatorPair(context)
    llm = OpenAIRealtimeLLMService(
        api_key="local", base_url=url,
        settings=OpenAIRealtimeLLMService.Settings(model="local", system_instruction="You are a helpful assistant."),
    )

    async def get_weather(params: FunctionCallParams) -> None:
        record.tool_calls.append(dict(params.arguments))
        await params.result_callback(f"{TOOL_RESULT} in {params.arguments['city']}")

    llm.register_function("get_weather", get_weather)
    return Pipeline([pair.user(), Tap(record, FrameDirection.UPSTREAM), llm, Tap(record, FrameDirection.DOWNSTREAM),
                     pair.assistant()])


async def session(url: str, speech: bytes, record: Record) -> None:
    worker = PipelineWorker(build(url, record), idle_timeout_secs=None)
    running = asyncio.create_task(WorkerRunner(handle_sigint=False).run(worker))
    try:
        await worker.queue_frames([LLMRunFrame()])  # turn one: the context's question
        await until(record, 1)
        # A transport would play the answer in real time before the user speaks again; without one its audio
        # arrives at once, and speech then would be heard as cutting in on it (the server's playback clock).
        await asyncio.sleep(record.spoken()[0]["audio_bytes"] / (2 * RATE))
        start = time.monotonic()
        for i in range(0, len(speech), CHUNK):  # turn two: spoken, at a microphone's pace
            await asyncio.sleep(max(0.0, start + i / (2 * RATE) - time.monotonic()))
            await worker.queue_frames([InputAudioRawFrame(audio=speech[i : i + CHUNK], sample_rate=RATE,
                                                          num_channels=1)])
        await until(record, 2)
    finally:
        await worker.cancel()
        await asyncio.wait_for(running, 30)


def main() -> None:
    url, speech = sys.argv[1], Path(sys.argv[2]).read_bytes()
    record = Record()
    failure = None
    try:
        asyncio.run(session(url, speech, record))
    except Exception as exc:  # reported, for the test to show
        failure = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"replies": record.done(), "tool_calls": record.tool_calls, "errors": record.errors,
                      "failure": failure}))


if __name__ == "__main__":
    main()
