"""Natural turn-taking over the real WebSocket: end of turn, interim text, barge-in, push-to-talk,
two sessions at once, and the Prometheus endpoint."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np

from app.audio import ASR_RATE, encode_webm_opus
from tests.conftest import JFK_TEXT, word_error_rate
from tests.test_server import (
    TIMEOUT,
    events_until_turn_end,
    next_event,
    of_type,
    send_recording,
    session,
)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * ASR_RATE), np.float32)


def speak_in_real_time(ws, pcm: np.ndarray) -> threading.Thread:
    """Stream a recording the way the page does, 100 ms at a time, on a thread of its own."""
    pieces = encode_webm_opus(pcm, ASR_RATE, piece_ms=100)

    def run() -> None:
        ws.send(json.dumps({"type": "audio_start"}))
        start = time.perf_counter()
        for i, piece in enumerate(pieces):
            time.sleep(max(0.0, start + (i + 1) * 0.1 - time.perf_counter()))
            ws.send(piece)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_end_of_turn_is_decided_after_the_configured_silence(live_server, jfk_pcm):
    first_words = jfk_pcm[: int(2.9 * ASR_RATE)]  # "And so my fellow Americans", then a pause
    with session(live_server) as ws:  # the default: hands-free, 500 ms
        send_recording(ws, encode_webm_opus(np.concatenate([first_words, silence(2)]), ASR_RATE))
        events, _ = events_until_turn_end(ws)
    (metrics,) = of_type(events, "metrics")
    assert 500 <= metrics["end_of_turn_ms"] <= 650, metrics
    assert "americans" in of_type(events, "transcript")[-1]["text"].lower()


def test_interim_transcripts_come_before_the_final_one(live_server, jfk_pcm):
    with session(live_server, end_silence_ms=1500) as ws:
        sender = speak_in_real_time(ws, np.concatenate([jfk_pcm, silence(2)]))
        events, _ = events_until_turn_end(ws)
        sender.join()
    started = of_type(events, "speech_started")[0]["turn"]
    transcripts = of_type(events, "transcript")
    interim = [t for t in transcripts if not t["final"]]
    assert interim, transcripts
    assert all(t["turn"] == started for t in transcripts)
    assert transcripts[-1]["final"] and word_error_rate(transcripts[-1]["text"], JFK_TEXT) < 0.1
    assert len(interim[0]["text"]) < len(transcripts[-1]["text"])


def test_speech_during_a_reply_cuts_it_off(live_server, jfk_pcm):
    with session(live_server) as ws:
        ws.send(json.dumps({"type": "text", "text": "Tell me a long story about a brave dragon."}))
        next_event(ws, "audio_start")
        sender = speak_in_real_time(ws, np.concatenate([jfk_pcm[: int(2.9 * ASR_RATE)], silence(1.5)]))
        t_started = last_audio = None
        events = []
        while True:
            message = ws.recv(timeout=TIMEOUT)
            now = time.perf_counter()
            if isinstance(message, bytes):
                last_audio = now
                continue
            event = json.loads(message)
            events.append(event)
            if event["type"] == "speech_started":
                t_started = now
            if event["type"] == "turn_end" and event["turn"] == 1:
                break
        sender.join()
        assert t_started is not None, events
        assert last_audio - t_started <= 0.2  # no reply audio after the barge-in was detected
        full = "".join(e["delta"] for e in of_type(events, "reply_text"))
        end = of_type(events, "turn_end")[0]
        assert end["reason"] == "interrupted"
        assert len(end["reply"]) < len(full)  # the history keeps only what was heard
        answer, _ = events_until_turn_end(ws)  # and the interruption itself is answered
        assert "americans" in of_type(answer, "transcript")[-1]["text"].lower()


def test_a_short_noise_does_not_interrupt_the_reply(live_server, jfk_pcm):
    noise = jfk_pcm[int(1.2 * ASR_RATE) : int(1.65 * ASR_RATE)]  # 450 ms cut from a word
    with session(live_server) as ws:
        ws.send(json.dumps({"type": "text", "text": "Tell me about the sea."}))
        next_event(ws, "audio_start")
        sender = speak_in_real_time(ws, np.concatenate([silence(0.3), noise, silence(1.0)]))
        events, _ = events_until_turn_end(ws)
        sender.join()
    assert not of_type(events, "speech_started")
    assert of_type(events, "turn_end")[0]["reason"] == "completed"


def test_push_to_talk_keeps_pauses_inside_one_turn(live_server, jfk_pcm):
    with session(live_server, mode="push_to_talk") as ws:
        send_recording(ws, encode_webm_opus(np.concatenate([jfk_pcm, silence(1)]), ASR_RATE))
        events, _ = events_until_turn_end(ws)
    (final,) = [t for t in of_type(events, "transcript") if t["final"]]
    assert word_error_rate(final["text"], JFK_TEXT) < 0.1  # all of it, though JFK pauses twice


def test_two_sessions_at_once_both_complete_and_neither_starves(live_server):
    results: dict[str, tuple[list[dict], bytes]] = {}
    heard: dict[str, float] = {}

    def converse(name: str, question: str, delay: float) -> None:
        with session(live_server) as ws:
            time.sleep(delay)
            ws.send(json.dumps({"type": "text", "text": question}))

            def note(event: dict) -> None:
                heard.setdefault(f"{name}_{event['type']}", time.perf_counter())

            results[name] = events_until_turn_end(ws, on_event=note)

    threads = [threading.Thread(target=converse, args=("a", "Tell me a long story about the sea and its ships.", 0)),
               threading.Thread(target=converse, args=("b", "What is two plus two?", 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for name in ("a", "b"):
        events, audio = results[name]
        assert of_type(events, "turn_end")[0]["reason"] == "completed", name
        assert len(audio) > 0, name
    # The LLM works in slices, so b's short answer is spoken while a's long one is still going.
    assert heard["b_audio_start"] < heard["a_turn_end"], heard


def test_metrics_endpoint_reports_latency_histograms(live_server):
    with session(live_server) as ws:
        ws.send(json.dumps({"type": "text", "text": "Hello!"}))
        events_until_turn_end(ws)
    text = urllib.request.urlopen(live_server + "/metrics").read().decode()
    assert 'voice_turn_stage_seconds_count{stage="first_audio"}' in text
    assert 'voice_turns_total{reason="completed"}' in text
    assert "voice_sessions_active" in text
