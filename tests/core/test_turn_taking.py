"""Natural turn-taking over the real WebSocket: end of turn, interim text, barge-in, push-to-talk,
two sessions at once, and the Prometheus endpoint."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import msgspec
import numpy as np

from app.audio import ASR_RATE
from app.config import Settings
from app.core.chunking import speakable
from app.core.metrics import STAGES
from tests.support import JFK_TEXT, encode_webm_opus, resample, serving, speak, word_error_rate, words
from tests.web.test_server import (
    TIMEOUT,
    events_until_turn_end,
    of_type,
    send_recording,
    session,
)
from tests.web.test_ws import ScriptedLlm, own_engines, served


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


def with_turns(settings: Settings, **turns) -> Settings:
    return msgspec.structs.replace(settings, turns=msgspec.structs.replace(settings.turns, **turns))


def counter(url: str, name: str, label: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    match = re.search(rf"^{name}_total\{{{label}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


STORY = ("Once upon a time, a brave young knight rode out from the castle on a cold morning to find the old dragon "
         "that lived in the grey hills beyond the wide river. He crossed a dark forest, and on the seventh day he saw "
         "smoke above the rocks. The dragon was not angry at all: it was lonely, and it asked the knight to stay "
         "for supper and tell it about the world.")


def story_llm(real, pace_s: float = 0.0) -> ScriptedLlm:
    """The same long story, a word every `pace_s`: a test of what happens during a reply needs one that lasts."""
    return ScriptedLlm(real, STORY, pace_s)


def test_the_silence_rule_ends_a_turn_after_the_configured_silence(cpu_settings, engines, jfk_pcm):
    first_words = jfk_pcm[: int(2.9 * ASR_RATE)]  # "And so my fellow Americans", then a pause
    settings = with_turns(cpu_settings, end_of_turn="silence", end_silence_ms=500)
    with served(own_engines(engines), settings) as url:
        with session(url) as ws:
            send_recording(ws, encode_webm_opus(np.concatenate([first_words, silence(2)]), ASR_RATE))
            events, _ = events_until_turn_end(ws)
        assert counter(url, "voice_end_of_turn", 'by="silence"') == 1
    (metrics,) = of_type(events, "metrics")
    assert 500 <= metrics["end_of_turn_ms"] <= 650, metrics
    assert "americans" in of_type(events, "transcript")[-1]["text"].lower()


def test_a_finished_question_ends_at_its_first_pause_and_its_guess_is_used(cpu_settings, engines):
    question = speak(engines.tts, "What is the capital of France?", ASR_RATE)
    with served(own_engines(engines), cpu_settings) as url:
        # Smart Turn at a 200 ms pause; a longest pause far beyond the time the transcript and the
        # LLM's reading of the words take on a slow machine, so that only they can end the turn early.
        with session(url, end_silence_ms=4000) as ws:
            sender = speak_in_real_time(ws, np.concatenate([question, silence(4.5)]))
            events, _ = events_until_turn_end(ws)
            sender.join()
        # Ended by Smart Turn and the LLM's reading of the words, answered by the guess started at the
        # pause: the transcript was not made twice.
        assert counter(url, "voice_end_of_turn", 'by="smart"') == 1
        assert counter(url, "voice_speculations", 'outcome="used"') == 1
    (metrics,) = of_type(events, "metrics")
    assert metrics["end_of_turn_ms"] < 4000, metrics
    assert metrics["transcript_ms"] <= metrics["first_audio_ms"]
    assert "capital of france" in of_type(events, "transcript")[-1]["text"].lower()


def test_interim_transcripts_come_before_the_final_one(live_server, jfk_pcm):
    # Push-to-talk: one turn, JFK's 1.1 s pause after "fellow Americans" included.
    with session(live_server, mode="push_to_talk") as ws:
        speak_in_real_time(ws, np.concatenate([jfk_pcm, silence(0.5)])).join()
        ws.send(json.dumps({"type": "audio_stop"}))
        events, _ = events_until_turn_end(ws)
    started = of_type(events, "speech_started")[0]["turn"]
    transcripts = of_type(events, "transcript")
    interim = [t for t in transcripts if not t["final"]]
    assert interim, transcripts
    assert all(t["turn"] == started for t in transcripts)
    assert transcripts[-1]["final"] and word_error_rate(transcripts[-1]["text"], JFK_TEXT) < 0.1
    assert len(interim[0]["text"]) < len(transcripts[-1]["text"])


def arrivals(ws, done) -> list[dict | bytes]:
    """Everything the server sends, in order (events as dicts, reply audio as bytes), until
    `done(events so far)` holds."""
    arrived: list[dict | bytes] = []
    while not done([m for m in arrived if isinstance(m, dict)]):
        message = ws.recv(timeout=TIMEOUT)
        arrived.append(message if isinstance(message, bytes) else json.loads(message))
    return arrived


def ended(turn: int):
    return lambda events: any(e["type"] == "turn_end" and e["turn"] == turn for e in events)


def test_speech_during_a_reply_cuts_it_off(cpu_settings, engines, jfk_pcm):
    # Written over 7 s, like a slow model's: the user speaks while the reply is still being made.
    llm = story_llm(engines.llm, pace_s=0.1)
    with served(own_engines(engines, llm=llm), cpu_settings) as url, session(url) as ws:
        ws.send(json.dumps({"type": "text", "text": "Tell me a long story about a brave dragon."}))
        before = arrivals(ws, lambda events: bool(of_type(events, "audio_start")))
        sender = speak_in_real_time(ws, np.concatenate([jfk_pcm[: int(2.9 * ASR_RATE)], silence(1.5)]))
        after = arrivals(ws, ended(1))
        sender.join()
        (started,) = [m for m in after if isinstance(m, dict) and m["type"] == "speech_started"]
        cut = after[after.index(started) :]
        assert not [m for m in cut if isinstance(m, bytes)], "reply audio went out after the barge-in"
        events = [m for m in before + after if isinstance(m, dict)]
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
        before = arrivals(ws, lambda events: bool(of_type(events, "audio_start")))
        speak_in_real_time(ws, np.concatenate([silence(0.3), noise, silence(1.0)])).join()
        ws.send(json.dumps({"type": "audio_stop"}))
        # Both turns must end: the reply's, and the recording's, whose every sample was heard by then.
        after = arrivals(ws, lambda events: len(of_type(events, "turn_end")) == 2)
    events = [m for m in before + after if isinstance(m, dict)]
    audio = b"".join(m for m in before + after if isinstance(m, bytes))
    assert not of_type(events, "speech_started")
    reply_end, noise_end = sorted(of_type(events, "turn_end"), key=lambda e: e["turn"])
    assert reply_end["reason"] == "completed" and noise_end["reason"] == "no_speech"
    # The page plays all of it: every sample the reply announced arrived, and all its words count as said.
    (audio_end,) = of_type(events, "audio_end")
    assert audio_end["samples"] * 2 == len(audio) > 0
    assert reply_end["reply"] == speakable("".join(e["delta"] for e in of_type(events, "reply_text")))


def test_push_to_talk_keeps_pauses_inside_one_turn(live_server, jfk_pcm):
    with session(live_server, mode="push_to_talk") as ws:
        send_recording(ws, encode_webm_opus(np.concatenate([jfk_pcm, silence(1)]), ASR_RATE))
        events, _ = events_until_turn_end(ws)
    (final,) = [t for t in of_type(events, "transcript") if t["final"]]
    assert word_error_rate(final["text"], JFK_TEXT) < 0.1  # all of it, though JFK pauses twice


def test_two_sessions_at_once_both_complete_and_neither_starves(cpu_settings, engines):
    # A word every 30 ms, SmolLM2's pace here: both replies are written slice by slice on the one worker.
    llm = story_llm(engines.llm, pace_s=0.03)
    with served(own_engines(engines, llm=llm), cpu_settings) as url, session(url) as a, session(url) as b:
        a.send(json.dumps({"type": "text", "text": "Tell me a long story about the sea and its ships."}))
        a_events = [m for m in arrivals(a, lambda events: bool(of_type(events, "audio_start")))
                    if isinstance(m, dict)]
        # a is speaking and its LLM is still writing: b asks something short now.
        b.send(json.dumps({"type": "text", "text": "What is two plus two?"}))
        b_first_audio = arrivals(b, lambda events: bool(of_type(events, "audio_start")))
        # Whatever reached a meanwhile is on its socket already: a's reply must still be going.
        a_events += [json.loads(m) for m in drain(a) if isinstance(m, str)]
        assert not of_type(a_events, "turn_end"), "b's first words waited for a's whole reply"
        b_events, b_audio = events_until_turn_end(b)
        a_rest, a_audio = events_until_turn_end(a)
    for events, audio in ((a_events + a_rest, a_audio), (b_first_audio + b_events, b_audio)):
        ends = of_type([e for e in events if isinstance(e, dict)], "turn_end")
        assert [e["reason"] for e in ends] == ["completed"]
        assert len(audio) > 0


def drain(ws) -> list[str | bytes]:
    """The messages already waiting on a socket, without waiting for more."""
    waiting = []
    while True:
        try:
            waiting.append(ws.recv(timeout=0))
        except TimeoutError:
            return waiting


def metric_samples(base_url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(base_url + "/metrics").read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_counts_exactly_the_turns_made(cpu_settings, engines):
    from app.web.server import create_app

    with serving(create_app(cpu_settings, engines)) as url:  # an app of its own: its counters start at 0
        with session(url) as ws:
            for question in ("Hello!", "What is two plus two?"):
                ws.send(json.dumps({"type": "text", "text": question}))
                assert of_type(events_until_turn_end(ws)[0], "turn_end")[0]["reason"] == "completed"
            send_recording(ws, encode_webm_opus(silence(1), ASR_RATE))
            assert of_type(events_until_turn_end(ws)[0], "turn_end")[0]["reason"] == "no_speech"
            during = metric_samples(url)
        deadline = time.monotonic() + 30  # the server notices the close on its own time
        while metric_samples(url)[("voice_sessions_active", ())] != 0.0:
            assert time.monotonic() < deadline, "the closed session is still counted as active"
            time.sleep(0.05)

    def count(stage: str) -> float:
        return during.get(("voice_turn_stage_seconds_count", (("stage", stage),)), 0.0)

    # Typed turns have no transcript stage; every other stage saw both turns.
    assert {stage: count(stage) for stage in STAGES} == {**dict.fromkeys(STAGES, 2.0), "transcript": 0.0}
    assert during[("voice_turns_total", (("reason", "completed"),))] == 2.0
    assert during[("voice_turns_total", (("reason", "no_speech"),))] == 1.0
    assert during[("voice_sessions_active", ())] == 1.0


def reply_until_all_sent(ws) -> tuple[list[dict], np.ndarray, int, float]:
    """Events, the reply's voice (float), its rate, and when its first chunk arrived (perf_counter()),
    once the server has sent all of it (it sends faster than real time)."""
    events, pcm, first = [], bytearray(), 0.0
    while not of_type(events, "audio_end"):
        message = ws.recv(timeout=TIMEOUT)
        if isinstance(message, bytes):
            first, pcm = first or time.perf_counter(), pcm + message
        else:
            events.append(json.loads(message))
    rate = of_type(events, "audio_start")[0]["sample_rate"]
    return events, np.frombuffer(bytes(pcm), "<i2").astype(np.float32) / 32768, rate, first


def heard_back(reply: np.ndarray, rate: int, played_from: float, start: float, seconds: float) -> np.ndarray:
    """What a microphone beside the speaker hears of the reply from `start` for `seconds`: the page plays it
    from `played_from`, the microphone gets it ECHO_DELAY_S later and ECHO_GAIN as loud, over room noise."""
    voice = resample(reply, rate, ASR_RATE)
    begin = int((start - played_from - ECHO_DELAY_S) * ASR_RATE)
    out = np.zeros(int(seconds * ASR_RATE), np.float32)
    part = voice[max(0, begin) : max(0, begin) + len(out)]
    out[: len(part)] = part * ECHO_GAIN
    return out + np.random.default_rng(1).normal(0, 0.002, len(out)).astype(np.float32)


def cough() -> np.ndarray:
    """A short loud burst: 200 ms of noise shaped like a cough (sharp onset, quick decay, chest-low)."""
    n = int(0.2 * ASR_RATE)
    noise = np.random.default_rng(2).normal(0, 1, n).astype(np.float32)
    low = np.convolve(noise, np.ones(8) / 8, mode="same")  # most of a cough's energy is below 2 kHz
    envelope = np.minimum(1.0, np.arange(n) / 160) * np.exp(-np.arange(n) / (0.06 * ASR_RATE))
    return (0.8 * low / np.abs(low).max() * envelope).astype(np.float32)


ECHO_DELAY_S = 0.12  # loudspeaker -> microphone -> capture -> Opus -> server
ECHO_GAIN = 0.3  # a laptop's speaker at a normal volume, heard by its own microphone


def test_the_reply_heard_back_and_a_cough_do_not_cut_it_and_the_user_does(cpu_settings, engines, jfk_pcm):
    """The page's microphone hears the reply it plays (fed back at 16 kHz, delayed and quieter, through
    Opus like the page's own recording), then a cough over it: the reply plays on. Then the user talks
    over it: it stops, and the server confirms the barge-in."""
    with served(own_engines(engines, llm=story_llm(engines.llm)), cpu_settings) as url, session(url) as ws:
        ws.send(json.dumps({"type": "text", "text": "Tell me a long story about a brave dragon and a knight."}))
        before, reply, rate, first = reply_until_all_sent(ws)
        played_from = first + 0.08  # the page's jitter buffer
        start = time.perf_counter() + 0.05
        left = len(reply) / rate - (start - played_from)
        assert left > 7.5, f"the reply has {left:.1f} s left to play: too short for the test"
        mic = heard_back(reply, rate, played_from, start, 9.0)
        mic[int(5.8 * ASR_RATE) :] *= 0.01  # the page has stopped playing by then: only room noise
        mic[int(2.0 * ASR_RATE) : int(2.2 * ASR_RATE)] += cough()
        user = jfk_pcm[: int(2.9 * ASR_RATE)]  # "And so my fellow Americans", from 4.3 s
        mic[int(4.0 * ASR_RATE) : int(4.0 * ASR_RATE) + len(user)] += user
        while time.perf_counter() < start:
            pass
        sender = speak_in_real_time(ws, mic)
        seen: list[tuple[float, dict]] = []
        while not [e for _, e in seen if e["type"] == "turn_end" and e["turn"] == 2]:
            message = ws.recv(timeout=TIMEOUT)
            if isinstance(message, str):
                seen.append((time.perf_counter() - start, json.loads(message)))
        sender.join()
    at = {e["type"]: t for t, e in reversed(seen)}  # when each kind first arrived, in seconds of the mic
    verdicts = [(round(t, 2), e["confirmed"]) for t, e in seen if e["type"] == "barge_in"]
    print("barge_in verdicts (s, confirmed):", verdicts, "speech_started at", at.get("speech_started"))
    assert 4.0 < at["speech_started"] < 4.0 + 1.6, seen  # the user, and no sooner: not the echo, not the cough
    assert [e["turn"] for _, e in seen if e["type"] == "speech_started"] == [2]
    # Heard as speech, and turned down: the echo and the cough were loud enough to count, and not the user.
    assert [t for t, confirmed in verdicts if not confirmed and t < 4.0], verdicts
    assert (True in [c for _, c in verdicts]) and at["barge_in"] <= at["speech_started"] + 0.1
    # All sent before the test began to play it, the reply ended "completed"; the user's turn is answered.
    final = [e for _, e in seen if e["type"] == "transcript" and e["turn"] == 2][-1]["text"]
    print("the user's turn:", final)
    assert whole_turn(final), final


def whole_turn(heard: str, first_half: tuple[str, ...] = ("and", "so", "my")) -> bool:
    """Whether the user's turn ("And so my fellow Americans") was heard whole, not its second half: at least two
    of its first three words among the four heard before "fellow". Losing the first half leaves at most one.
    The echo still plays under its first 1.8 s, and tiny Whisper mishears the mix: "And stole my fellow
    America.", "and so am I fellow Americans.", "He was an so my fellow Americans.", and once the echo's own
    last words before it ("to have been amazing. And so my fellow Americans.")."""
    said = words(heard)
    if "fellow" not in said:
        return False
    at = len(said) - 1 - said[::-1].index("fellow")
    return sum(word in said[max(0, at - 4) : at] for word in first_half) >= 2


def test_a_whole_turn_may_follow_the_echos_last_words_but_not_lose_its_first_half() -> None:
    assert whole_turn("to have been amazing. And so my fellow Americans.")
    assert whole_turn("And stole my fellow America.") and whole_turn("and so am I fellow Americans.")
    assert whole_turn("He was an so my fellow Americans.") and whole_turn("And so am I, fellow American.")
    assert not whole_turn("fellow Americans.") and not whole_turn("my fellow Americans.")
    assert not whole_turn("to have been amazing, and fellow dragons were there.")
    assert not whole_turn("So the dragon flew. My fellow Americans.")  # "so" is the echo's, far before
