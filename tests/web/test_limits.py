"""Limits (app/core/limits.py) against the real server: each one hit gets its error, and the other
sessions lose nothing. Plus the two the core keeps: queued turns, and the length of a spoken turn
when the audio comes faster than real time."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import numpy as np
import pytest
from openai import OpenAI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.audio import ASR_RATE
from app.config import Settings
from app.core import events as ev
from app.core.events import ERROR_MESSAGES
from app.core.limits import LimitSettings
from app.core.turns import Event, TurnDetector
from app.engines.loaded import Engines
from app.engines.vad import WINDOW, StreamingVad
from tests.core.test_conversation import run, turn_end, wait_for
from tests.support import encode_webm_opus, raw_client, recording, send_text_frame, words
from tests.web.test_realtime import append_in_real_time, chunks, pcm24, receive, until
from tests.web.test_realtime import connect as realtime
from tests.web.test_server import of_type, session
from tests.web.test_ws import STORY, SpyLlm, events_until, own_engines, send, served, turn_ends

TIMEOUT = 120


def limited(settings: Settings, **limits) -> Settings:
    return msgspec.structs.replace(settings, limits=LimitSettings(**limits))


def assert_closed(ws, code: int) -> None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


def a_turn_completes(ws, turn: int) -> None:
    send(ws, "text", text="Hi there.")
    assert turn_ends(events_until(ws, turn), turn) == ["completed"]


def test_past_max_sessions_the_next_is_told_busy_and_the_others_go_on(cpu_settings, engines, app_log):
    with served(own_engines(engines), limited(cpu_settings, max_sessions=2)) as url:
        with session(url) as first, session(url) as second:
            with connect(url.replace("http", "ws") + "/ws") as third:
                error = json.loads(third.recv(timeout=10))  # instead of `ready`
                assert error == {"type": "error", "code": "busy", "message": ERROR_MESSAGES["busy"], "turn": None}
                assert_closed(third, 1013)  # try again later
            a_turn_completes(first, 1)
            a_turn_completes(second, 1)
        with session(url) as fourth:  # a place is free again
            a_turn_completes(fourth, 1)
    assert "refused: 2 sessions open" in app_log.text


def test_a_frame_over_max_frame_bytes_is_refused_unread_and_others_go_on(cpu_settings, engines):
    settings = limited(cpu_settings, max_frame_bytes=600 * 1024)
    with served(own_engines(engines), settings) as url, session(url) as other, session(url) as ws:
        ws.send(bytes(600 * 1024 + 1))
        assert_closed(ws, 1009)  # "message too big": uvicorn stops at the header, never reads it whole
        a_turn_completes(other, 1)


def test_a_text_over_max_text_chars_is_refused_and_the_session_goes_on(cpu_settings, engines, app_log):
    with served(own_engines(engines), cpu_settings) as url, session(url) as ws:
        send(ws, "text", text="a" * 2001)
        send(ws, "text", text="Hi there.")
        events = events_until(ws, 1)  # the refused text made no turn
    (error,) = of_type(events, "error")
    assert error == {"type": "error", "code": "too_long", "message": ERROR_MESSAGES["too_long"], "turn": None}
    assert turn_ends(events, 1) == ["completed"]
    assert "refused a text of 2001 characters (at most 2000)" in app_log.text


def test_a_system_prompt_that_leaves_no_room_is_refused_at_hello(cpu_settings, engines, app_log):
    # 2048 context - 32 reply (SpyLlm's) - 1500 room - 64 template = 452 tokens for the system prompt.
    settings = limited(cpu_settings, prompt_room_tokens=1500)
    llm = SpyLlm(engines.llm)
    llm.count_tokens = engines.llm.count_tokens
    with served(own_engines(engines, llm=llm), settings) as url, session(url) as ws:
        send(ws, "hello", system_prompt="You are a very helpful assistant. " * 100)  # about 600 tokens
        send(ws, "text", text="Hi there.")
        events = events_until(ws, 1)
    (error,) = of_type(events, "error")
    assert error == {"type": "error", "code": "too_long", "message": ERROR_MESSAGES["too_long"], "turn": None}
    assert turn_ends(events, 1) == ["completed"]
    assert llm.turns[0][0]["content"] == cpu_settings.llm.system_prompt  # the refused hello changed nothing
    assert re.search(r"refused a system prompt of \d+ tokens \(at most 452\)", app_log.text)


def test_typing_while_two_turns_wait_drops_the_oldest(engines: Engines):
    async def script(conversation, events):
        for i in range(5):  # all at once: nothing is answered in between
            conversation.say(f"Say the number {i}.")
        await wait_for(events, turn_end(5))

    events = run(engines, script)
    ends = {e.turn: e.reason for e in events if isinstance(e, ev.TurnEnd)}
    assert ends == {1: "interrupted", 2: "interrupted", 3: "interrupted", 4: "completed", 5: "completed"}
    dropped = [e for e in events if isinstance(e, ev.Error)]
    assert [(e.code, e.turn) for e in dropped] == [("turn_dropped", 1), ("turn_dropped", 2), ("turn_dropped", 3)]
    assert {e.turn for e in events if isinstance(e, ev.Transcript)} == {4, 5}


def test_max_turn_s_holds_when_the_audio_comes_faster_than_real_time(cpu_settings, engines, jfk_pcm):
    settings = msgspec.structs.replace(cpu_settings.turns, max_turn_s=3.0)
    detector = TurnDetector(settings, StreamingVad(engines.vad_model))
    found = detector.feed(jfk_pcm)  # 11 s of speech in one go, as a flooding client sends it
    turns = [detector.take_turn()[0] for event in found if event is Event.TURN_ENDED]
    assert len(turns) >= 3
    assert all(len(audio) <= 3.0 * 16000 + WINDOW for audio in turns)  # checked once per VAD window


# ---------------------------------------------------------------- a client that stops reading


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


class LongWindedVoice:
    """The real Piper voice, each phrase followed by `pad_s` of silence in half-second chunks, made
    at 100x real time: replies long enough to fill the kernel's socket buffers (~3 MB here) fast."""

    def __init__(self, real, pad_s: float = 20.0) -> None:
        self._real, self.pad_s = real, pad_s
        self.name, self.sample_rate = real.name, real.sample_rate

    def new_voice(self, speaker=None):
        return self._real.new_voice(speaker)

    def synthesize(self, text, *, voice=None, cancel=None):
        yield from self._real.synthesize(text, voice=voice, cancel=cancel)
        chunk = np.zeros(self.sample_rate // 2, np.int16)
        for _ in range(int(self.pad_s * 2)):
            if cancel is not None and cancel.is_set():
                return
            time.sleep(0.005)
            yield chunk


CAP = 512 * 1024  # about 12 s of Piper's voice; the story's is minutes long, and a reader keeps up with it


@contextmanager
def a_story_nobody_reads(cpu_settings, engines) -> Iterator[tuple[str, socket.socket]]:
    """A server whose outgoing cap is CAP, and a raw client that asked it for a long-winded story and
    reads nothing; yields (the server's URL, that client's socket)."""
    settings = limited(cpu_settings, max_outgoing_bytes=CAP)
    slow = own_engines(engines, llm=SpyLlm(engines.llm, max_tokens=200), tts=LongWindedVoice(engines.tts))
    with served(slow, settings) as url:
        silent = raw_client(url)
        try:
            send_text_frame(silent, json.dumps({"type": "text", "text": STORY}))
            yield url, silent
        finally:
            silent.close()


def wait_until_its_audio_is_cut(url: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while metric(url, "voice_dropped_audio_total") < 1:  # the socket's buffers are full now
        assert time.monotonic() < deadline, "the silent client's reply was never cut"
        time.sleep(0.5)


def test_a_client_that_stops_reading_is_bounded_and_the_others_go_on(cpu_settings, engines, app_log):
    with a_story_nobody_reads(cpu_settings, engines) as (url, _):
        with session(url) as ws:
            a_turn_completes(ws, 1)
        wait_until_its_audio_is_cut(url)
        with session(url) as ws:  # still served while the silent client holds its socket
            a_turn_completes(ws, 1)
    waiting = [int(n) for n in re.findall(r"not reading \((\d+) bytes wait to go out", app_log.text)]
    # The cap bounds the audio; the reply's text events are never refused and may sit among it (a few hundred
    # bytes: one run logged 524,349 bytes against a cap of 524,288).
    assert waiting and all(n <= CAP + 4096 for n in waiting), waiting


def test_a_client_that_sends_but_never_reads_is_closed(cpu_settings, engines, app_log):
    with a_story_nobody_reads(cpu_settings, engines) as (url, flood):
        wait_until_its_audio_is_cut(url)
        # Every malformed message is answered with an error, which can no longer go out: the
        # server closes the session, and its conversation is gone.
        for sent in range(1, 40_001):
            send_text_frame(flood, "{not json")
            if sent % 100 == 0 and metric(url, "voice_sessions_active") == 0:
                break
        assert metric(url, "voice_sessions_active") == 0, "the flood client's session is still open"
        with session(url) as ws:  # the server goes on
            a_turn_completes(ws, 1)
    (waiting,) = [int(n) for n in re.findall(r"sends but does not read \((\d+) bytes wait", app_log.text)]
    assert 2 * CAP < waiting < 2 * CAP + 4096  # closed as soon as it passed twice the cap


# ---------------------------------------------------------------- audio faster than real time
#
# The server hears a session's audio at most max_audio_speed (2x) real time after a burst of max_audio_burst_s
# (5 s here); what comes faster is dropped, counted in voice_input_audio_seconds_total{fate}. Whatever the
# machine's pace, what was heard can never be more than the burst and twice the time it took.

BURST_S = 5.0
FLOOD_S = 30.0  # seconds of audio sent at FLOOD_SPEED
FLOOD_SPEED = 5.0


def paced(send_one, pieces: list, piece_s: float, speed: float) -> float:
    """Send `pieces` of `piece_s` seconds each at `speed` times real time; returns when the first went out."""
    start = time.monotonic()
    for i, piece in enumerate(pieces):
        time.sleep(max(0.0, start + i * piece_s / speed - time.monotonic()))
        send_one(piece)
    return start


def input_seconds(url: str, fate: str) -> float:
    return metric(url, f'voice_input_audio_seconds_total{{fate="{fate}"}}')


def all_accounted(url: str, seconds: float) -> tuple[float, float]:
    """(heard, dropped) once `seconds` of audio have been one or the other."""
    deadline = time.monotonic() + TIMEOUT
    while (heard := input_seconds(url, "heard")) + (dropped := input_seconds(url, "dropped")) < seconds:
        assert time.monotonic() < deadline, f"only {heard + dropped:.1f} s of {seconds} s came through"
        time.sleep(0.2)
    return heard, dropped


def test_ws_audio_at_five_times_real_time_is_dropped_with_an_error_and_never_piles_up(cpu_settings, engines):
    pieces = encode_webm_opus(np.zeros(int(FLOOD_S * ASR_RATE), np.float32), ASR_RATE)  # 100 ms each
    with served(own_engines(engines), limited(cpu_settings, max_audio_burst_s=BURST_S)) as url, session(url) as ws:
        send(ws, "audio_start", mime_type="audio/webm;codecs=opus")
        start = paced(ws.send, pieces, 0.1, FLOOD_SPEED)
        send(ws, "audio_stop")
        heard, dropped = all_accounted(url, FLOOD_S - 0.2)
        elapsed = time.monotonic() - start
        errors = [e for e in events_until(ws, 1) if e["type"] == "error"]  # the recording's turn: no speech
    assert errors[0] == {"type": "error", "code": "audio_too_fast", "message": ERROR_MESSAGES["audio_too_fast"],
                         "turn": None}
    assert len(errors) <= elapsed + 1  # said once a second at most, not once per dropped piece
    assert heard <= BURST_S + 2.0 * elapsed + 0.1, (heard, elapsed)
    assert dropped >= FLOOD_S - BURST_S - 2.0 * elapsed - 0.3, (dropped, elapsed)


def test_realtime_audio_at_five_times_real_time_is_dropped_with_an_error(cpu_settings, engines):
    with served(own_engines(engines), limited(cpu_settings, max_audio_burst_s=BURST_S)) as url, realtime(url) as conn:
        start = paced(lambda piece: conn.input_audio_buffer.append(audio=piece),
                      chunks(pcm24(np.zeros(int(FLOOD_S * 24_000), np.float32))), 0.1, FLOOD_SPEED)
        while (event := receive(conn))["type"] != "error":
            pass
        heard, dropped = all_accounted(url, FLOOD_S - 0.2)
        elapsed = time.monotonic() - start
    assert event["error"]["code"] == "audio_too_fast" and event["error"]["type"] == "invalid_request_error"
    assert event["error"]["message"] == ERROR_MESSAGES["audio_too_fast"]
    assert heard <= BURST_S + 2.0 * elapsed + 0.1, (heard, elapsed)
    assert dropped >= FLOOD_S - BURST_S - 2.0 * elapsed - 0.3, (dropped, elapsed)


def test_speech_at_real_time_is_never_refused_and_is_answered(cpu_settings, engines):
    speech = np.concatenate([recording("jfk.flac", 24_000), np.zeros(2 * 24_000, np.float32)])
    with served(own_engines(engines), limited(cpu_settings, max_audio_burst_s=BURST_S)) as url, realtime(url) as conn:
        append_in_real_time(conn, speech)  # 13 s: more than twice the burst
        events = until(conn, "response.done")
        heard, dropped = all_accounted(url, 12.9)
    assert not [e for e in events if e["type"] == "error"]
    assert dropped == 0 and heard >= 12.9
    heard_words = " ".join(e["transcript"] for e in events
                           if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert words(heard_words)[:3] == ["and", "so", "my"], heard_words  # the speech itself, from its start


# ---------------------------------------------------------------- sessions nobody uses


def closed_idle(ws, timeout_s: float) -> list[dict]:
    """Every JSON event until the server closes the socket for want of use (1000, "idle")."""
    events = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            if isinstance(message := ws.recv(timeout=TIMEOUT), str):
                events.append(json.loads(message))
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "idle")
    message = ERROR_MESSAGES["idle"].format(minutes=f"{round(timeout_s)} seconds")
    idle = {"type": "error", "code": "idle", "message": message, "turn": None}
    assert idle in events
    # After it only the end of the recording, stopped as the session ends.
    assert {e["type"] for e in events[events.index(idle) + 1 :]} <= {"state", "turn_end"}, events
    return events


@contextmanager
def a_silent_microphone(send_one, pieces: list) -> Iterator[None]:
    """`pieces` of 100 ms sent at real time on a thread, until the block ends or the socket closes."""
    stop = threading.Event()

    def run() -> None:
        with contextlib.suppress(ConnectionClosed):
            start = time.monotonic()
            for i, piece in enumerate(pieces):
                if stop.wait(max(0.0, start + i * 0.1 - time.monotonic())):
                    return
                send_one(piece)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_a_ws_session_with_only_a_silent_microphone_is_closed_as_idle(cpu_settings, engines, app_log):
    pieces = encode_webm_opus(np.zeros(60 * ASR_RATE, np.float32), ASR_RATE)
    with served(own_engines(engines), limited(cpu_settings, idle_timeout_s=3.0)) as url, session(url) as ws:
        send(ws, "audio_start", mime_type="audio/webm;codecs=opus")
        opened = time.monotonic()
        with a_silent_microphone(ws.send, pieces):
            closed_idle(ws, 3.0)
        assert time.monotonic() - opened >= 3.0 - 0.2  # the client's clock started after the server's
        assert metric(url, "voice_sessions_active") == 0
    assert re.search(r"session \w+ closed: unused for 3 s", app_log.text)


def test_a_ws_heartbeat_is_answered_at_once_but_is_no_use_that_keeps_a_session_open(cpu_settings, engines):
    """Each `ping` gets a `pong` (the page finds a half-open socket by its absence), yet a session that only
    pings is closed for want of use like any other."""
    with served(own_engines(engines), limited(cpu_settings, idle_timeout_s=3.0)) as url, session(url) as ws:
        pings = ['{"type":"ping"}'] * 100
        events = []
        with a_silent_microphone(ws.send, pings), pytest.raises(ConnectionClosed) as closed:
            while True:
                if isinstance(message := ws.recv(timeout=TIMEOUT), str):
                    events.append(json.loads(message))
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "idle")
    kinds = [e["type"] for e in events]
    # A ping every 100 ms for the 3 s the session lived: about 30 answered (one at a time, so a few may merge).
    assert kinds.count("pong") >= 10 and set(kinds) <= {"pong", "error", "state"}, kinds
    assert [e["code"] for e in events if e["type"] == "error"] == ["idle"]


class SlowStart(SpyLlm):
    """Thinks for `think_s` before each reply: a reply under way for longer than the idle timeout."""

    think_s = 5.0

    def stream_slice(self, prompt, so_far, **options):
        if not so_far:
            time.sleep(self.think_s)
        return super().stream_slice(prompt, so_far, **options)


def test_a_ws_session_in_use_stays_open_past_the_idle_timeout_and_closes_once_unused(cpu_settings, engines):
    with served(own_engines(engines, llm=SlowStart(engines.llm)), limited(cpu_settings, idle_timeout_s=4.0)) as url, \
            session(url) as ws:
        send(ws, "text", text="Hi there.")
        assert turn_ends(events_until(ws, 1), 1) == ["completed"]  # thought for longer than the timeout
        for _ in range(3):  # seven seconds more, a message every 2.5 s
            time.sleep(2.5)
            send(ws, "hello", temperature=0.5)
        send(ws, "text", text="Thanks.")
        assert turn_ends(events_until(ws, 2), 2) == ["completed"]
        ended = time.monotonic()
        events = closed_idle(ws, 4.0)
    assert time.monotonic() - ended >= 4.0 - 1.0
    assert [e["code"] for e in events if e["type"] == "error"] == ["idle"]


def test_a_realtime_session_with_only_a_silent_microphone_is_closed_as_idle(cpu_settings, engines):
    pieces = chunks(pcm24(np.zeros(60 * 24_000, np.float32)))
    with served(own_engines(engines), limited(cpu_settings, idle_timeout_s=3.0)) as url, realtime(url) as conn:
        with a_silent_microphone(lambda piece: conn.input_audio_buffer.append(audio=piece), pieces):
            with pytest.raises(ConnectionClosed) as closed:
                while (event := receive(conn))["type"] != "error":
                    pass
                receive(conn)
    assert event["error"]["code"] == "idle"
    assert event["error"]["message"] == ERROR_MESSAGES["idle"].format(minutes="3 seconds")
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "idle")


# ---------------------------------------------------------------- sessions of one address


def admitted(url: str) -> None:
    """Until a new /ws session of this address gets `ready` (a closed session frees its place as it ends)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with connect(url.replace("http", "ws") + "/ws") as ws:
            if json.loads(ws.recv(timeout=10))["type"] == "ready":
                return
        assert time.monotonic() < deadline, "no place came free"
        time.sleep(0.2)


def test_one_address_holds_at_most_max_sessions_per_client_across_both_endpoints(cpu_settings, engines, app_log):
    too_many = {"type": "error", "code": "too_many_sessions", "message": ERROR_MESSAGES["too_many_sessions"],
                "turn": None}
    with served(own_engines(engines), limited(cpu_settings, max_sessions_per_client=2)) as url:
        with session(url) as first:
            with realtime(url):
                with connect(url.replace("http", "ws") + "/ws") as third:
                    assert json.loads(third.recv(timeout=10)) == too_many  # instead of `ready`
                    assert_closed(third, 1013)  # try again later
                client = OpenAI(base_url=f"{url}/v1", api_key="local")
                with client.realtime.connect(model="local") as fourth:
                    refused = receive(fourth)
                    with pytest.raises(ConnectionClosed) as closed:
                        fourth.recv_bytes()
                assert refused["error"]["code"] == "too_many_sessions" and closed.value.rcvd.code == 1013
                a_turn_completes(first, 1)  # the sessions it has go on
            admitted(url)  # the realtime session closed: its place is free again
    assert "refused: it has 2 open (limits.max_sessions_per_client)" in app_log.text
