"""Limits (app/core/limits.py) against the real server: each one hit gets its error, and the other
sessions lose nothing. Plus the two the core keeps: queued turns, and the length of a spoken turn
when the audio comes faster than real time."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.config import Settings
from app.core import events as ev
from app.core.events import ERROR_MESSAGES
from app.core.limits import LimitSettings
from app.core.turns import Event, TurnDetector
from app.engines.loaded import Engines
from app.engines.vad import WINDOW, StreamingVad
from tests.core.test_conversation import run, turn_end, wait_for
from tests.support import raw_client, send_text_frame
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
    match = re.search(rf"^{name} (\S+)$", text, re.M)
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
