"""The conversation over the real /ws (app/web/ws.py in front of the core): reset, bad audio, interrupts
and the exact history they keep, failing stages, a client that leaves, settings changed mid-sentence."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import numpy as np
import pytest
from websockets.sync.client import ClientConnection

from app.audio import ASR_RATE
from app.config import Settings
from app.core.events import ERROR_MESSAGES
from app.engines.asr import Transcriber
from app.engines.llm import ChatModel, Message, Prompt
from app.engines.loaded import Engines
from app.engines.tools import ToolSet
from app.engines.tts.base import TtsEngine
from app.engines.workers import Worker
from app.web.server import create_app
from app.web.ws import MAX_AUDIO_FRAME
from tests.support import JFK_TEXT, encode_webm_opus, said_so_far, serving, speak, word_error_rate, words
from tests.web.test_server import next_event, of_type, send_recording, session

# ---------------------------------------------------------------- over the real /ws, with spies
#
# Each test below serves an app of its own, whose Engines hold the real cpu-preset models behind
# fresh worker threads, often through thin wrappers that delegate to them: spies that record
# what the session asked of a model, or a model that fails once on purpose. The tests see only
# the wire and the spies, so they hold for any Session behind /ws.

TIMEOUT = 120  # seconds for one turn; the cpu preset on 2 cores needs a few
QUESTION = "What is the capital of France?"
STORY = "Tell me a story about a brave little dragon."


class SpyLlm:
    """The real ChatModel with a shorter reply limit, recording the messages of each reply."""

    def __init__(self, real: ChatModel, max_tokens: int = 32) -> None:
        self._real = real
        self.settings = msgspec.structs.replace(real.settings, max_tokens=max_tokens)
        self.turns: list[list[Message]] = []  # what each reply was built from, as it was then

    def build_messages(
        self, history: list[Message], user_text: str | None, system_prompt: str | None = None,
        tools: ToolSet | None = None,
    ) -> list[Message]:
        messages = self._real.build_messages(history, user_text, system_prompt, tools)
        self.turns.append(copy.deepcopy(messages))  # the session edits its history in place later
        return messages

    def prompt(self, messages: list[Message], tools: ToolSet | None = None) -> Prompt:
        return self._real.prompt(messages, tools)

    def count_tokens(self, text: str) -> int:
        return self._real.count_tokens(text)

    def stream_slice(self, prompt: Prompt, so_far: str, **options) -> Iterator[tuple[str, bool]]:
        return self._real.stream_slice(prompt, so_far, **options)


WORD = re.compile(r"\S+\s*")  # a word with the space after it, as a reply is written


class ScriptedLlm(SpyLlm):
    """Writes one fixed reply, a word every `pace_s`, whatever it is asked: for a test about what happens to a
    reply (its length, its timing, its sound), not about what the model chose to say. Issue 31's prompt keeps
    SmolLM2's replies to a few words, and how many depends on the sampling."""

    def __init__(self, real: ChatModel, text: str, pace_s: float = 0.0) -> None:
        super().__init__(real, max_tokens=200)
        self._words, self._pace_s = WORD.findall(text), pace_s

    def stream_slice(self, prompt: Prompt, so_far: str, *, max_new: int, cancel: threading.Event | None = None,
                     **options) -> Iterator[tuple[str, bool]]:
        done = len(WORD.findall(so_far))
        for i, word in enumerate(self._words[done : done + max_new], done + 1):
            time.sleep(self._pace_s)
            if cancel is not None and cancel.is_set():
                return  # as the real model stops: a cut-off reply frees the worker at once
            yield word, i == len(self._words)


class CrashingLlm(SpyLlm):
    """Its first slice crashes mid-stream, as a model running out of memory would; then it works."""

    crashed = False

    def stream_slice(self, prompt: Prompt, so_far: str, **options) -> Iterator[tuple[str, bool]]:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("language model crashed")
        yield from self._real.stream_slice(prompt, so_far, **options)


class SilentLlm(SpyLlm):
    """Writes nothing at all for its first reply; then it works."""

    silenced = False

    def stream_slice(self, prompt: Prompt, so_far: str, **options) -> Iterator[tuple[str, bool]]:
        if not self.silenced:
            self.silenced = True
            return iter(())
        return self._real.stream_slice(prompt, so_far, **options)


class BrokenHistoryLlm(SpyLlm):
    """Fails once outside every model stage (building the prompt): a bug, not a model failure."""

    broke = False

    def build_messages(
        self, history: list[Message], user_text: str | None, system_prompt: str | None = None,
        tools: ToolSet | None = None,
    ) -> list[Message]:
        if not self.broke:
            self.broke = True
            raise KeyError("content")
        return super().build_messages(history, user_text, system_prompt, tools)


class CrashingAsr:
    """The real Whisper, whose first transcription crashes; then it works."""

    def __init__(self, real: Transcriber) -> None:
        self._real = real
        self.crashed = False

    def transcribe(self, audio: np.ndarray) -> str:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("speech model crashed")
        return self._real.transcribe(audio)


class SpyVoice:
    """The real Piper voice, recording each phrase it spoke whole and its length in samples.

    hold_after(n): the phrase after the next n waits for `release`, freezing a reply mid-way.
    `started` counts the phrases the engine began to work on.
    """

    def __init__(self, real: TtsEngine) -> None:
        self._real = real
        self.name, self.sample_rate = real.name, real.sample_rate
        self.spoken: list[tuple[str, int]] = []
        self.started = 0
        self.holding, self.release = threading.Event(), threading.Event()
        self._hold_at: int | None = None

    def hold_after(self, phrases: int) -> None:
        self._hold_at = self.started + phrases + 1

    def new_voice(self, speaker: int | None = None) -> object | None:
        return self._real.new_voice(speaker)

    def synthesize(
        self, text: str, *, voice: object | None = None, cancel: threading.Event | None = None
    ) -> Iterator[np.ndarray]:
        self.started += 1
        if self.started == self._hold_at:
            self.holding.set()
            self.release.wait(TIMEOUT)
            if cancel is not None and cancel.is_set():
                return
        samples = 0
        for chunk in self._real.synthesize(text, voice=voice, cancel=cancel):
            samples += len(chunk)
            yield chunk
        if cancel is None or not cancel.is_set():
            self.spoken.append((text, samples))


class WatchedWorker:
    """An engine's own worker, telling the test when a session hands it a streamed job."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.handed = threading.Event()

    def stream(self, make):
        # The session iterates the stream at once, which queues the job in the same loop step:
        # nothing can happen on the loop between `handed` and the job being queued.
        self.handed.set()
        return self._worker.stream(make)

    def __getattr__(self, name: str):
        return getattr(self._worker, name)


def own_engines(engines: Engines, *, asr=None, llm=None, tts=None) -> Engines:
    """The real models (or wrappers of them) behind worker threads of this test's own."""
    return Engines(asr or engines.asr, llm or SpyLlm(engines.llm), tts or engines.tts)


@contextmanager
def served(engines: Engines, settings: Settings) -> Iterator[str]:
    try:
        with serving(create_app(settings, engines)) as url:
            yield url
    finally:
        # Every job of this test ends before the next test runs the same models on other threads.
        for worker in (engines.asr_worker, engines.llm_worker, engines.tts_worker):
            drain(worker)
        engines.close()


def drain(worker: Worker) -> None:
    """Wait until every job handed to `worker` so far has run (or been dropped)."""
    asyncio.run(worker.run(lambda: None))


def occupy(worker: Worker) -> threading.Event:
    """Keep `worker` busy with a blocking job (another session's, say) until the event is set."""
    started, release = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        release.wait(TIMEOUT)

    threading.Thread(target=lambda: asyncio.run(worker.run(busy)), daemon=True).start()
    assert started.wait(TIMEOUT)
    return release


def events_until(ws: ClientConnection, turn: int) -> list[dict]:
    """Every JSON event up to and including the turn_end of `turn`."""
    events = []
    while True:
        message = ws.recv(timeout=TIMEOUT)
        if isinstance(message, str):
            events.append(json.loads(message))
            if events[-1]["type"] == "turn_end" and events[-1]["turn"] == turn:
                return events


def send(ws: ClientConnection, kind: str, **fields) -> None:
    ws.send(json.dumps({"type": kind, **fields}))


def turn_ends(events: list[dict], turn: int) -> list[str]:
    return [e["reason"] for e in of_type(events, "turn_end") if e["turn"] == turn]


def reply_of(events: list[dict], turn: int) -> str:
    return "".join(e["delta"] for e in of_type(events, "reply_text") if e["turn"] == turn)


def played_share(spoken: list[tuple[str, int]]) -> tuple[int, str]:
    """A playback position in the middle of the second phrase: (samples played, words heard),
    the words being the whole first phrase and the played half of the second's, rounded down."""
    (first, first_len), (second, second_len) = spoken[:2]
    played = first_len + (second_len + 1) // 2
    half = second.split()[: len(second.split()) // 2]
    return played, " ".join([first, *half])


@pytest.fixture(scope="module")
def question_pieces(engines: Engines) -> list[bytes]:
    """QUESTION said by Piper, then a second of silence, as the page's 100 ms WebM/Opus pieces."""
    pcm = np.concatenate([speak(engines.tts, QUESTION, ASR_RATE), np.zeros(ASR_RATE, np.float32)])
    return encode_webm_opus(pcm, ASR_RATE)


def test_reset_ends_queued_turns_stops_the_reply_and_forgets_the_history(cpu_settings, engines, jfk_pcm):
    llm, voice = SpyLlm(engines.llm), SpyVoice(engines.tts)
    pieces = encode_webm_opus(jfk_pcm, ASR_RATE)
    with served(own_engines(engines, llm=llm, tts=voice), cpu_settings) as url, \
            session(url, mode="push_to_talk", temperature=0.0) as ws:
        send(ws, "text", text=QUESTION)
        samples = next_event(ws, "audio_end")["samples"]
        next_event(ws, "turn_end")
        # The page played all of it (else the next speech cuts the history by the server's clock).
        send(ws, "interrupt", played_samples=samples)
        send(ws, "audio_start")
        for piece in pieces:
            ws.send(piece)
        spoken_turn = next_event(ws, "speech_started")["turn"]
        voice.hold_after(1)  # the typed turn's reply stops after its first phrase
        send(ws, "text", text=STORY)  # typed while still talking: answered first
        try:
            assert voice.holding.wait(TIMEOUT), "the reply had a single phrase"
            send(ws, "audio_stop")  # the spoken turn ends and waits behind the reply
            next_event(ws, "speech_stopped")
            send(ws, "reset")
            events = events_until(ws, spoken_turn + 1)
        finally:
            voice.release.set()
        send(ws, "text", text="Hi.")
        after = events_until(ws, spoken_turn + 2)
    assert turn_ends(events, spoken_turn) == ["interrupted"]
    assert not [e for e in of_type(events, "transcript") if e["turn"] == spoken_turn and e["final"]]
    assert turn_ends(events, spoken_turn + 1) == ["interrupted"]
    assert not [e for e in after if e.get("turn") in (spoken_turn, spoken_turn + 1)]  # nothing more of them
    assert turn_ends(after, spoken_turn + 2) == ["completed"]
    assert len(llm.turns) == 3  # the first question, the story, "Hi.": the queued turn never ran
    assert [m["role"] for m in said_so_far(llm.turns[1])] == ["user", "assistant", "user"]  # it had a past
    assert [m["role"] for m in said_so_far(llm.turns[2])] == ["user"]  # and then none


def test_an_audio_frame_over_the_limit_is_refused_and_nothing_else_is_lost(
    cpu_settings, engines, question_pieces, app_log
):
    half = len(question_pieces) // 2
    with served(own_engines(engines), cpu_settings) as url, session(url) as ws:
        send(ws, "audio_start")
        for piece in question_pieces[:half]:
            ws.send(piece)
        ws.send(bytes(MAX_AUDIO_FRAME + 1))
        for piece in question_pieces[half:]:
            ws.send(piece)
        send(ws, "audio_stop")
        events = events_until(ws, 1)
    (error,) = of_type(events, "error")
    assert error["code"] == "bad_audio" and error["message"] == ERROR_MESSAGES["bad_audio"]
    assert f"skipped an audio frame of {MAX_AUDIO_FRAME + 1} bytes" in app_log.text  # the details: in the log
    (transcript,) = [e for e in of_type(events, "transcript") if e["final"]]
    assert word_error_rate(transcript["text"], QUESTION) <= 0.2  # both halves were heard
    assert turn_ends(events, 1) == ["completed"]


def test_audio_without_audio_start_is_decoded_and_answered(cpu_settings, engines, question_pieces):
    with served(own_engines(engines), cpu_settings) as url, session(url) as ws:
        for piece in question_pieces:
            ws.send(piece)
        send(ws, "audio_stop")
        events = events_until(ws, 1)
    assert not of_type(events, "error")
    (transcript,) = [e for e in of_type(events, "transcript") if e["final"]]
    assert word_error_rate(transcript["text"], QUESTION) <= 0.2
    assert turn_ends(events, 1) == ["completed"] and reply_of(events, 1)


@pytest.mark.parametrize("mime_type", ["audio/mpeg", "audio/ogg;codecs=opus"])
def test_a_recording_not_in_a_container_it_declares_that_we_read_is_refused_and_the_next_is_heard(
    live_server, question_pieces, app_log, mime_type
):
    """An unknown type is refused at once and its bytes dropped; WebM declared as Ogg fails to open as Ogg. Either
    way `bad_audio` and nothing heard: FFmpeg is never left to find the real container by probing."""
    with session(live_server) as ws:
        send(ws, "audio_start", mime_type=mime_type)
        for piece in question_pieces:
            ws.send(piece)
        send(ws, "audio_stop")
        refused = next_event(ws, "error")
        send_recording(ws, question_pieces)  # then the same speech, declared as what it is
        events = [refused]
        while not [e for e in of_type(events, "turn_end") if e["reason"] == "completed"]:
            events.append(next_json(ws))
    assert [e["code"] for e in of_type(events, "error")] == ["bad_audio"]
    assert refused["message"] == ERROR_MESSAGES["bad_audio"]
    (transcript,) = [e for e in of_type(events, "transcript") if e["final"]]  # only the second recording's
    assert word_error_rate(transcript["text"], QUESTION) <= 0.2
    if mime_type == "audio/mpeg":
        assert "refused a recording in 'audio/mpeg'" in app_log.text
        assert not [e for e in events if e["type"] == "turn_end" and e["reason"] != "completed"]  # no turn began


def next_json(ws: ClientConnection) -> dict:
    while isinstance(message := ws.recv(timeout=TIMEOUT), bytes):
        pass
    return json.loads(message)


def test_an_interrupt_mid_reply_keeps_exactly_the_words_played(cpu_settings, engines):
    llm, voice = SpyLlm(engines.llm, max_tokens=80), SpyVoice(engines.tts)
    voice.hold_after(2)  # the reply stops being made after its second phrase
    with served(own_engines(engines, llm=llm, tts=voice), cpu_settings) as url, \
            session(url, temperature=0.0) as ws:
        send(ws, "text", text=STORY)
        try:
            assert voice.holding.wait(TIMEOUT), "the reply had fewer than three phrases"
            played, heard = played_share(voice.spoken)
            send(ws, "interrupt", played_samples=played)
            events = events_until(ws, 1)
        finally:
            voice.release.set()
        send(ws, "text", text="And then?")
        events_until(ws, 2)
    (end,) = of_type(events, "turn_end")
    assert end == {"type": "turn_end", "turn": 1, "reason": "interrupted", "reply": heard}
    assert_a_prefix(heard, reply_of(events, 1))
    assert said_so_far(llm.turns[1]) == [
        {"role": "user", "content": STORY},
        {"role": "assistant", "content": heard},
        {"role": "user", "content": "And then?"},
    ]


def test_an_interrupt_after_the_reply_keeps_exactly_the_words_played(cpu_settings, engines):
    """The reply was all sent, and the page was still playing it when the user stopped it."""
    llm, voice = SpyLlm(engines.llm, max_tokens=60), SpyVoice(engines.tts)
    with served(own_engines(engines, llm=llm, tts=voice), cpu_settings) as url, \
            session(url, temperature=0.0) as ws:
        send(ws, "text", text=STORY)
        events = events_until(ws, 1)
        assert turn_ends(events, 1) == ["completed"] and len(voice.spoken) >= 2, voice.spoken
        played, heard = played_share(voice.spoken)
        send(ws, "interrupt", played_samples=played)
        send(ws, "text", text="And then?")
        events_until(ws, 2)
    assert_a_prefix(heard, of_type(events, "turn_end")[0]["reply"])
    story = [{"role": "user", "content": STORY}, {"role": "assistant", "content": heard}]
    assert said_so_far(llm.turns[1])[:2] == story


def assert_a_prefix(heard: str, reply: str) -> None:
    """`heard` is the start of `reply`, word for word, and not all of it."""
    assert heard and words(reply)[: len(words(heard))] == words(heard), (heard, reply)
    assert len(words(heard)) < len(words(reply))


@pytest.mark.parametrize(
    ("llm_kind", "code", "says"),
    [
        (CrashingLlm, "llm_failed", "language model crashed"),
        (SilentLlm, "llm_failed", "empty reply"),
        (BrokenHistoryLlm, "internal_error", "KeyError: 'content'"),
    ],
)
def test_a_failed_reply_ends_its_turn_once_and_the_session_goes_on(
    cpu_settings, engines, llm_kind, code, says, app_log
):
    """The client hears the code's one message; what failed inside goes to the log only."""
    with served(own_engines(engines, llm=llm_kind(engines.llm)), cpu_settings) as url, session(url) as ws:
        send(ws, "text", text=QUESTION)
        events = events_until(ws, 1)
        send(ws, "text", text=QUESTION)  # sent earlier, it would have cut the first turn off
        events += events_until(ws, 2)
    (error,) = of_type(events, "error")
    assert error["code"] == code and error["turn"] == 1 and error["message"] == ERROR_MESSAGES[code], error
    assert says not in error["message"] and says in app_log.text
    assert turn_ends(events, 1) == ["error"]
    assert turn_ends(events, 2) == ["completed"] and reply_of(events, 2)


def test_a_failed_transcription_ends_its_turn_once_and_the_session_goes_on(
    cpu_settings, engines, question_pieces, app_log
):
    # No interim transcripts: the one failure must be the final transcript's.
    turns = msgspec.structs.replace(cpu_settings.turns, interim_every_ms=0)
    settings = msgspec.structs.replace(cpu_settings, turns=turns)
    asr = CrashingAsr(engines.asr)
    with served(own_engines(engines, asr=asr), settings) as url, session(url) as ws:
        send_recording(ws, question_pieces)
        first = events_until(ws, 1)
        send_recording(ws, question_pieces)
        second = events_until(ws, 2)
    (error,) = of_type(first, "error")
    assert error["code"] == "asr_failed" and error["turn"] == 1 and error["message"] == ERROR_MESSAGES["asr_failed"]
    assert "speech model crashed" in app_log.text
    assert turn_ends(first + second, 1) == ["error"]
    (transcript,) = of_type(second, "transcript")
    assert word_error_rate(transcript["text"], QUESTION) <= 0.2
    assert turn_ends(second, 2) == ["completed"]


def test_a_client_that_leaves_mid_reply_frees_its_queued_work(cpu_settings, engines):
    voice = SpyVoice(engines.tts)
    own = own_engines(engines, tts=voice)
    own.tts_worker = watched = WatchedWorker(own.tts_worker)
    with served(own, cpu_settings) as url:
        release = occupy(own.tts_worker)  # another session's long phrase holds the voice
        try:
            with session(url) as ws:
                send(ws, "text", text=QUESTION)
                assert watched.handed.wait(TIMEOUT)  # its first phrase waits behind it
            wait_for_metric(url, 'voice_turns_total{reason="interrupted"} 1.0')  # the server cut it off
        finally:
            release.set()
        drain(own.tts_worker)
    assert voice.started == 0


def wait_for_metric(url: str, line: str) -> None:
    """Until /metrics shows `line` (the server acts on a disconnect in its own time)."""
    deadline = time.monotonic() + TIMEOUT
    while line not in urllib.request.urlopen(url + "/metrics").read().decode():
        assert time.monotonic() < deadline, f"/metrics never showed {line}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "change",
    [{"end_silence_ms": 1500}, {"mode": "push_to_talk"}],  # longer than JFK's pauses (1.1 s at most)
    ids=["longer-pause", "push-to-talk"],
)
def test_hello_mid_recording_applies_to_the_turn_being_spoken(cpu_settings, engines, jfk_pcm, change):
    pieces = encode_webm_opus(jfk_pcm, ASR_RATE)
    head = pieces[:15]  # 1.5 s: JFK has begun, his first pause (from 2.25 s) is still to come
    # The fixed silence rule: with the smart one a pause can end the turn before the longest silence.
    turns = msgspec.structs.replace(cpu_settings.turns, end_of_turn="silence")
    settings = msgspec.structs.replace(cpu_settings, turns=turns)
    with served(own_engines(engines), settings) as url, session(url, end_silence_ms=500) as ws:
        send(ws, "audio_start")
        for piece in head:
            ws.send(piece)
        next_event(ws, "speech_started")
        send(ws, "hello", **change)  # the user changes a setting while speaking
        for piece in pieces[len(head) :]:
            ws.send(piece)
        send(ws, "audio_stop")
        events = events_until(ws, 1)
    # Hands-free at 500 ms would have ended the turn at each of his pauses.
    assert len(of_type(events, "speech_stopped")) == 1 and not of_type(events, "speech_started")
    assert [e["reason"] for e in of_type(events, "turn_end")] == ["completed"]
    (transcript,) = [e for e in of_type(events, "transcript") if e["final"]]
    assert word_error_rate(transcript["text"], JFK_TEXT) < 0.15
