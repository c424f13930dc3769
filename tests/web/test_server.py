"""The real app over a real WebSocket: whole turns through the cpu preset's models."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from websockets.sync.client import ClientConnection, connect

from app.audio import ASR_RATE
from app.core.events import ERROR_MESSAGES
from app.core.reply import JITTER_BUFFER_S
from app.engines.loaded import Engines
from tests.support import JFK_TEXT, encode_webm_opus, serving, word_error_rate

TIMEOUT = 120  # seconds for one turn; the cpu preset on 2 cores needs a few


@contextmanager
def session(base_url: str, **hello) -> Iterator[ClientConnection]:
    with connect(base_url.replace("http", "ws") + "/ws", max_size=None) as ws:
        ready = json.loads(ws.recv(timeout=10))
        assert ready["type"] == "ready"
        ws.send(json.dumps({"type": "hello", **hello}))
        yield ws


def events_until_turn_end(ws: ClientConnection, *, on_event=None) -> tuple[list[dict], bytes]:
    """Collect JSON events and PCM bytes until the first turn_end."""
    events, audio = [], bytearray()
    while True:
        message = ws.recv(timeout=TIMEOUT)
        if isinstance(message, bytes):
            audio += message
            continue
        event = json.loads(message)
        events.append(event)
        if on_event is not None:
            on_event(event)
        if event["type"] == "turn_end":
            return events, bytes(audio)


def next_event(ws: ClientConnection, kind: str) -> dict:
    """Skip to the next JSON event of this type."""
    while True:
        message = ws.recv(timeout=TIMEOUT)
        if isinstance(message, str) and (event := json.loads(message))["type"] == kind:
            return event


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


def send_recording(ws: ClientConnection, pieces: list[bytes]) -> None:
    """What the page does: audio_start, the recorder's pieces in order, audio_stop."""
    ws.send(json.dumps({"type": "audio_start", "mime_type": "audio/webm;codecs=opus"}))
    for piece in pieces:
        ws.send(piece)
    ws.send(json.dumps({"type": "audio_stop"}))


def test_spoken_turn_end_to_end(live_server, jfk_pcm):
    pieces = encode_webm_opus(np.concatenate([jfk_pcm, np.zeros(ASR_RATE, np.float32)]), ASR_RATE)
    # Push-to-talk: the turn is the whole recording, JFK's 1.1 s pause after "fellow Americans" included.
    with session(live_server, mode="push_to_talk") as ws:
        send_recording(ws, pieces)
        events, audio = events_until_turn_end(ws)
    kinds = [e["type"] if e["type"] != "transcript" or e["final"] else "interim" for e in events]
    assert kinds.index("speech_started") < kinds.index("speech_stopped") < kinds.index("transcript")
    (transcript,) = [t for t in of_type(events, "transcript") if t["final"]]
    assert word_error_rate(transcript["text"], JFK_TEXT) < 0.1
    reply = "".join(e["delta"] for e in of_type(events, "reply_text"))
    assert len(reply.split()) >= 2
    (start,), (end,) = of_type(events, "audio_start"), of_type(events, "audio_end")
    assert start["sample_rate"] == 22050
    assert end["samples"] * 2 == len(audio) > 22050  # s16le, at least a second of speech
    assert np.abs(np.frombuffer(audio, "<i2")).max() > 1000  # real sound, not silence
    (turn_end,) = of_type(events, "turn_end")
    assert turn_end["reason"] == "completed" and turn_end["reply"]
    assert_metrics_in_order(of_type(events, "metrics")[0])


def assert_metrics_in_order(m: dict) -> None:
    # A turn answered on speculation from a pause is transcribed, and may be written, before its
    # end is decided; but no audio goes out before that.
    stages = ["transcript_ms", "first_token_ms", "first_phrase_ms", "first_audio_ms", "total_ms"]
    values = [m[s] for s in stages]
    assert all(v is not None for v in values) and m["end_of_turn_ms"] is not None, m
    assert values == sorted(values) and m["end_of_turn_ms"] <= m["first_audio_ms"], m


def test_typed_text_turn_and_memory(live_server):
    with session(live_server, temperature=0.0) as ws:
        events, audio = ask(ws, "What is the capital of France?")
        assert of_type(events, "transcript")[0]["text"] == "What is the capital of France?"
        assert "paris" in of_type(events, "turn_end")[0]["reply"].lower()
        assert len(audio) > 0
        events, _ = ask(ws, "Which city did you just name? Answer with the city only.")
        assert "paris" in of_type(events, "turn_end")[0]["reply"].lower()  # only the first turn says which
    with session(live_server, temperature=0.0) as ws:  # a new conversation has no such memory
        events, _ = ask(ws, "Which city did you just name? Answer with the city only.")
        assert "paris" not in of_type(events, "turn_end")[0]["reply"].lower()


def ask(ws: ClientConnection, question: str) -> tuple[list[dict], bytes]:
    """One typed turn, listened to the end the way a person does: a message typed while the reply
    still plays would cut it off, and the history would keep only what was heard by then."""
    first_audio: list[float] = []

    def note(event: dict) -> None:
        if event["type"] == "audio_start":
            first_audio.append(time.perf_counter())  # its audio follows at once

    ws.send(json.dumps({"type": "text", "text": question}))
    events, audio = events_until_turn_end(ws, on_event=note)
    assert of_type(events, "turn_end")[0]["reason"] == "completed", events
    (start,) = of_type(events, "audio_start")
    # The page starts playing on its first chunk; the server's playback clock started before we got it.
    played_out = first_audio[0] + JITTER_BUFFER_S + len(audio) / 2 / start["sample_rate"]
    time.sleep(max(0.0, played_out + 0.05 - time.perf_counter()))
    return events, audio


def test_malformed_messages_are_answered_and_skipped(live_server, app_log):
    with session(live_server) as ws:
        ws.send("{not json")
        ws.send(json.dumps({"type": "text", "text": ""}))
        errors = [next_event(ws, "error") for _ in range(2)]
        assert all(e["code"] == "bad_message" and e["message"] == ERROR_MESSAGES["bad_message"] for e in errors)
        assert "malformed" in app_log.text and "text is empty" in app_log.text  # msgspec's words: the log's
        ws.send(json.dumps({"type": "text", "text": "Hello!"}))
        events, _ = events_until_turn_end(ws)
        assert of_type(events, "turn_end")[0]["reason"] == "completed"


def test_garbage_audio_is_an_error_and_a_no_speech_turn(live_server):
    with session(live_server) as ws:
        send_recording(ws, [b"\x1a\x45\xdf\xa3 this is no webm" * 10] * 10)
        events, audio = events_until_turn_end(ws)
    assert of_type(events, "error")[0]["code"] == "bad_audio"
    assert of_type(events, "turn_end")[0]["reason"] == "no_speech"
    assert audio == b""


def test_silence_ends_with_no_speech(live_server):
    pieces = encode_webm_opus(np.zeros(2 * ASR_RATE, np.float32), ASR_RATE)
    with session(live_server) as ws:
        send_recording(ws, pieces)
        events, _ = events_until_turn_end(ws)
    assert not of_type(events, "speech_started")
    assert of_type(events, "turn_end")[0]["reason"] == "no_speech"


def test_interrupt_stops_the_reply(live_server):
    with session(live_server) as ws:
        ws.send(json.dumps({"type": "text", "text": "Tell me a long story about a brave dragon."}))

        def interrupt_on_first_audio(event):
            if event["type"] == "audio_start":
                ws.send(json.dumps({"type": "interrupt"}))

        events, _ = events_until_turn_end(ws, on_event=interrupt_on_first_audio)
        end = of_type(events, "turn_end")[0]
        assert end["reason"] == "interrupted"
        assert of_type(events, "audio_end")  # the audio stream is closed too
        full = "".join(e["delta"] for e in of_type(events, "reply_text"))
        assert len(end["reply"]) < len(full)  # only what was spoken counts as said


def test_a_client_that_vanishes_mid_reply_does_not_stop_the_server(live_server):
    with session(live_server) as ws:
        ws.send(json.dumps({"type": "text", "text": "Tell me about the moon."}))
        next_event(ws, "audio_start")
    with session(live_server) as ws:  # the next visitor is served as usual
        ws.send(json.dumps({"type": "text", "text": "Hi there."}))
        events, _ = events_until_turn_end(ws)
        assert of_type(events, "turn_end")[0]["reason"] == "completed"


class BrokenVoice:
    """Stands in for a TTS model that crashes, to check the error path in isolation."""

    name = "broken"
    sample_rate = 22050

    def new_voice(self):
        return None

    def synthesize(self, text, *, voice=None, cancel=None):
        raise RuntimeError("voice model crashed")
        yield  # a generator, like real engines

    def warm_up(self):
        pass


def test_a_failing_stage_is_said_in_words_and_ends_the_turn(cpu_settings, engines, app_log):
    from app.web.server import create_app

    broken = Engines(engines.asr, engines.llm, BrokenVoice())
    with serving(create_app(cpu_settings, broken)) as url, session(url) as ws:
        ws.send(json.dumps({"type": "text", "text": "Hello!"}))
        events, _ = events_until_turn_end(ws)
    (error,) = of_type(events, "error")
    assert error == {"type": "error", "code": "tts_failed", "message": "Sorry, I could not speak the reply.", "turn": 1}
    assert "voice model crashed" in app_log.text  # the details stay in the server's log
    assert of_type(events, "turn_end")[0]["reason"] == "error"


def test_page_health_and_status(live_server):
    page = urllib.request.urlopen(live_server + "/").read().decode()
    assert "/static/app.js" in page and "htmx" in page
    health = json.loads(urllib.request.urlopen(live_server + "/health").read())
    assert health["status"] == "ok" and health["preset"] == "cpu"
    status = urllib.request.urlopen(live_server + "/status").read().decode()
    assert "Ready" in status and "cpu" in status
    assert urllib.request.urlopen(live_server + "/static/player-worklet.js").status == 200


def test_there_are_no_openapi_pages(live_server):
    """Litestar's schema pages would answer without pairing and load third-party scripts into this origin."""
    for path in ("/schema", "/schema/swagger", "/schema/redoc", "/schema/openapi.json", "/schema/openapi.yaml"):
        try:
            urllib.request.urlopen(live_server + path, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404, path
        else:
            raise AssertionError(f"{path} answered")
