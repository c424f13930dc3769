"""The session's own logic, driven directly: a user who pauses and goes on is answered once."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from app.audio import ASR_RATE
from app.session import Session


async def run_session(engines, script) -> list[dict]:
    """Serve a Session over in-memory queues while `script(session, events)` drives it."""
    inbox: asyncio.Queue[dict] = asyncio.Queue()
    events: list[dict] = []

    async def send_text(text: str) -> None:
        events.append(json.loads(text))

    async def send_bytes(data: bytes) -> None:
        pass

    session = Session(engines)
    serving = asyncio.create_task(session.serve(inbox.get, send_text, send_bytes))
    try:
        await asyncio.wait_for(script(session, events), timeout=120)
    finally:
        inbox.put_nowait({"type": "websocket.disconnect"})
        await serving
    return events


async def wait_for(events: list[dict], predicate) -> dict:
    while True:
        for event in events:
            if predicate(event):
                return event
        await asyncio.sleep(0.01)


def test_a_pause_before_the_answer_starts_merges_both_parts(engines, jfk_pcm):
    part1 = jfk_pcm[: int(2.9 * ASR_RATE)]  # "And so my fellow Americans,"
    part2 = jfk_pcm[int(3.4 * ASR_RATE) : int(6.9 * ASR_RATE)]  # "ask not what your country..."

    async def script(session: Session, events: list[dict]) -> None:
        session.speech_started()
        now = time.perf_counter()
        session.speech_turn(part1, now, now)
        await wait_for(events, lambda e: e == {"type": "state", "state": "thinking"})
        session.speech_started()  # the user goes on before any reply audio exists
        now = time.perf_counter()
        session.speech_turn(part2, now, now)
        await wait_for(events, lambda e: e["type"] == "turn_end" and e["turn"] == 2)

    events = asyncio.run(run_session(engines, script))
    ends = [e for e in events if e["type"] == "turn_end"]
    assert ends[0] == {"type": "turn_end", "turn": 1, "reason": "interrupted", "reply": ""}
    assert ends[1]["reason"] == "completed"
    (final,) = [e for e in events if e["type"] == "transcript" and e["turn"] == 2]
    assert "americans" in final["text"].lower() and "country" in final["text"].lower()
    assert not any(e["type"] == "audio_start" and e["turn"] == 1 for e in events)


def test_an_interrupt_with_played_samples_trims_a_finished_reply(engines):
    async def script(session: Session, events: list[dict]) -> None:
        session.on_control(json.dumps({"type": "text", "text": "Tell me about the moon."}))
        end = await wait_for(events, lambda e: e["type"] == "turn_end")
        assert end["reason"] == "completed" and session.history[-1]["content"] == end["reply"]
        # The page is still playing it when the user stops it after one second.
        session.on_control(json.dumps({"type": "interrupt", "played_samples": ASR_RATE}))
        heard = session.history[-1]["content"] if session.history else ""
        assert len(heard) < len(end["reply"])

    asyncio.run(run_session(engines, script))


def test_played_samples_zero_forgets_the_exchange(engines):
    async def script(session: Session, events: list[dict]) -> None:
        session.on_control(json.dumps({"type": "text", "text": "Say hello."}))
        await wait_for(events, lambda e: e["type"] == "turn_end")
        assert len(session.history) == 2
        session.on_control(json.dumps({"type": "interrupt", "played_samples": 0}))
        assert session.history == []

    asyncio.run(run_session(engines, script))


def test_silence_between_turns_is_not_a_turn(engines):
    async def script(session: Session, events: list[dict]) -> None:
        session.speech_started()
        now = time.perf_counter()
        session.speech_turn(np.zeros(ASR_RATE, np.float32), now, now)
        end = await wait_for(events, lambda e: e["type"] == "turn_end")
        assert end["reason"] == "no_speech"

    asyncio.run(run_session(engines, script))
