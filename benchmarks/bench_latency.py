"""Voice-to-voice latency of whole spoken turns, measured like a browser would experience it, under two
end-of-turn rules in one run: the old one (a fixed 500 ms of silence, nothing started before it) and
the new one (app/core/end_rule.py: Smart Turn's verdict on the sound and the LLM's on the words, from a
192 ms pause on, with the transcript and the reply started on speculation at the first 96 ms of silence).

Streams spoken questions in real time over the WebSocket as the page sends them (--transport: Ogg/Opus, a page
per 20 ms packet, as Chromium's page does with WebCodecs; or MediaRecorder's WebM in 60 ms frames), and times
end of the user's speech -> first reply PCM received (the page starts playing a chunk this long at
once). Then sentences from a real recording with a 0.6-1.0 s pause in the middle: were they cut in
two, and how much later does their answer come (benchmarks/bench_turns.py judges the rules offline on
real human speech). Prints a table, both medians and their ratio, and writes JSON. It starts the app
in-process on the cpu preset:

    uv run python benchmarks/bench_latency.py --turns 5 --out bench-results/latency.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path
from typing import NamedTuple

import numpy as np
from websockets.sync.client import connect

from app.audio import ASR_RATE
from tests.support import encode_ogg_opus, encode_webm_opus, recording, serving, speak

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you suggest a name for a black cat?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
]


def spoken_questions(n: int) -> list[tuple[str, np.ndarray]]:
    """The questions spoken by Piper's joe voice, at 16 kHz."""
    from app.engines.tts.piper import PiperEngine, PiperSettings

    voice = PiperEngine.load(PiperSettings())
    return [(text, speak(voice, text, ASR_RATE)) for text in (QUESTIONS * n)[:n]]


def start_local_server(preset: str, stack: ExitStack) -> str:
    """Load the preset and serve it in this process until `stack` closes; returns its /ws URL."""
    from app.config import load_settings
    from app.startup import load_and_warm

    settings = load_settings(preset)
    engines = stack.enter_context(closing(load_and_warm(settings)))
    return serve(engines, settings, stack)


def serve(engines, settings, stack: ExitStack) -> str:
    """Serve `engines` with `settings` in this process until `stack` closes; returns its /ws URL."""
    from app.web.server import create_app

    base = stack.enter_context(serving(create_app(settings, engines)))
    return base.replace("http", "ws", 1) + "/ws"


OLD_RULE = {"end_of_turn": "silence", "end_silence_ms": 500, "speculate": False}


def start_both_rules(preset: str, stack: ExitStack, overrides: dict | None = None):
    """One set of models, served twice: with the old end-of-turn rule and with the new (default)
    one. Returns {rule: /ws URL}; turns are run one at a time.
    `overrides` are settings of both (by default greedy replies)."""
    import msgspec

    from app.config import load_settings
    from app.engines.loaded import Engines
    from app.startup import load_and_warm

    # Greedy replies: both rules then say the same words to the same transcript, so the comparison
    # is of turn taking, not of sampling luck (SmolLM2-135M at 0.3 answers in French about half the time).
    settings = load_settings(preset, overrides or {"llm": {"temperature": 0.0}})
    new = stack.enter_context(closing(load_and_warm(settings)))
    old_settings = msgspec.structs.replace(settings, turns=msgspec.structs.replace(settings.turns, **OLD_RULE))
    old = Engines(new.asr, new.llm, new.tts)  # the same models behind worker threads of its own
    stack.callback(old.close)
    return {"old": serve(old, old_settings, stack), "new": serve(new, settings, stack)}


def speech_end_seconds(pcm: np.ndarray) -> float:
    """End of the last 10 ms frame louder than -40 dBFS: where the talker actually stopped."""
    frames = pcm[: len(pcm) // 160 * 160].reshape(-1, 160)
    loud = np.nonzero(np.sqrt((frames**2).mean(axis=1)) > 0.01)[0]
    return (loud[-1] + 1) * 160 / ASR_RATE if len(loud) else 0.0


class Transport(NamedTuple):
    """How the page sends the microphone (static/audio.js)."""

    piece_ms: int
    mime_type: str
    encode: Callable[[np.ndarray, int], list[bytes]]


# Where WebCodecs is (Chromium), the page writes each 20 ms Opus packet as an Ogg page and sends it at once;
# elsewhere MediaRecorder sends WebM, each 60 ms Opus frame as it is made (Chromium's frame size).
TRANSPORTS = {
    "ogg": Transport(20, "audio/ogg;codecs=opus", lambda pcm, ms: encode_ogg_opus(pcm, ASR_RATE, frame_ms=ms)),
    "webm": Transport(60, "audio/webm;codecs=opus", lambda pcm, ms: encode_webm_opus(pcm, ASR_RATE, piece_ms=ms)),
}


def send_in_real_time(ws, pieces: list[bytes], piece_ms: int, t_start: float) -> None:
    for i, piece in enumerate(pieces):  # piece i exists once (i+1) * piece_ms have been spoken
        time.sleep(max(0.0, t_start + (i + 1) * piece_ms / 1000 - time.perf_counter()))
        ws.send(piece)


def listen_to_turn(ws) -> tuple[float | None, list[dict]]:
    """(perf_counter() of the first reply audio received or None, the JSON events up to turn_end)."""
    first_audio, events = None, []
    while not events or events[-1]["type"] != "turn_end":
        message = ws.recv(timeout=300)
        if isinstance(message, bytes):
            first_audio = first_audio or time.perf_counter()
        else:
            events.append(json.loads(message))
    return first_audio, events


def start_speaking(
    ws, speech: np.ndarray, trailing_silence: float, transport: Transport = TRANSPORTS["ogg"]
) -> tuple[float, threading.Thread]:
    """Begin sending `speech` and then silence in real time on a thread; returns (its start, the thread)."""
    audio = np.concatenate([speech, np.zeros(int(trailing_silence * ASR_RATE), np.float32)])
    pieces = transport.encode(audio, transport.piece_ms)
    ws.send(json.dumps({"type": "audio_start", "mime_type": transport.mime_type}))
    t_start = time.perf_counter()
    sender = threading.Thread(target=send_in_real_time, args=(ws, pieces, transport.piece_ms, t_start))
    sender.start()
    return t_start, sender


def run_turn(ws, speech: np.ndarray, trailing_silence: float, transport: Transport = TRANSPORTS["ogg"]) -> dict:
    """Speak one turn in real time while listening; return client- and server-side timings."""
    t_start, sender = start_speaking(ws, speech, trailing_silence, transport)
    t_speech_end = t_start + speech_end_seconds(speech)
    first_audio, events = listen_to_turn(ws)
    result: dict = {}
    for event in events:
        if event["type"] == "transcript":
            result["transcript"] = event["text"]
        elif event["type"] == "metrics":
            result["server"] = event
        elif event["type"] == "turn_end":
            result["reason"], result["reply"] = event["reason"], event["reply"]
    sender.join()
    ws.send(json.dumps({"type": "audio_stop"}))  # its turn was found, so no extra end event
    result["voice_to_voice_ms"] = None if first_audio is None else round(
        (first_audio - t_speech_end) * 1000, 1)
    return result


def run_turns(url: str, turns: list[tuple[str, np.ndarray]], silence: float) -> list[dict]:
    """One session, the turns one after another; prints a line per turn."""
    results = []
    with connect(url, max_size=None) as ws:
        ws.recv(timeout=30)  # ready
        for text, speech in turns:
            r = run_turn(ws, speech, silence)
            r["question"] = text
            results.append(r)
            s = r.get("server", {})
            print(f"{r['voice_to_voice_ms']!s:>8} ms client | server: eot {s.get('end_of_turn_ms')} "
                  f"asr {s.get('transcript_ms')} token {s.get('first_token_ms')} "
                  f"phrase {s.get('first_phrase_ms')} audio {s.get('first_audio_ms')} | "
                  f"{r.get('transcript', '')!r} -> {r.get('reply', '')[:50]!r}")
    return results


# ------------------------------------------------------------ sentences with a pause in the middle

# JFK's speech in the repo's recording (seconds): "And so my fellow Americans" 0.3-2.3, "ask" 3.3-3.75,
# "not" 4.0-4.4, "what your country can do for you" 5.45-7.65, "ask what you can do for your country"
# 8.25-10.55. A case is the parts of one sentence and the pause put after each part but the last (the
# recording's own room tone): pauses of 0.5 s or more are a speaker thinking mid-sentence, where
# cutting the turn is always wrong; shorter ones only join two parts. Where two parts meet inside
# continuous speech, the cut is moved to the quietest 10 ms nearby.
PAUSE_CASES = [
    ("And so my fellow | Americans, ask not what your country can do for you",
     [(0.0, 1.76), (1.76, 2.35), (3.2, 4.45), (5.4, 7.75)], [0.8, 0.3, 0.3]),
    ("And so my fellow Americans, ask not | what your country can do for you",
     [(0.0, 2.35), (3.2, 4.45), (5.4, 7.75)], [0.3, 0.6]),
    ("And so my fellow Americans, ask not | what your country can do for you",
     [(0.0, 2.35), (3.2, 4.45), (5.4, 7.75)], [0.3, 0.8]),
    ("And so my fellow Americans, ask not | what your country can do for you",
     [(0.0, 2.35), (3.2, 4.45), (5.4, 7.75)], [0.3, 1.0]),
    ("And so my fellow Americans, ask not what your | country can do for you",
     [(0.0, 2.35), (3.2, 4.45), (5.4, 6.04), (6.04, 7.75)], [0.3, 0.3, 0.8]),
    ("ask what you can do | for your country", [(8.2, 9.72), (9.72, 10.6)], [0.8]),
    ("And so my fellow Americans | ask not what your country can do for you",
     [(0.0, 2.35), (3.2, 4.45), (5.4, 7.75)], [0.7, 0.3]),
]
ROOM_TONE = (2.45, 3.15)  # the recording's own quiet between "Americans" and "ask"
THINKING_PAUSE = 0.5


def quietest(pcm: np.ndarray, t: float, within: float = 0.08) -> float:
    frame = ASR_RATE // 100
    start = int((t - within) * ASR_RATE) // frame
    frames = range(start, start + int(2 * within * 100))
    energies = [float(np.mean(pcm[k * frame : (k + 1) * frame] ** 2)) for k in frames]
    return (start + int(np.argmin(energies))) * frame / ASR_RATE


def pause_cases() -> list[tuple[str, np.ndarray, list[float]]]:
    """(words, 16 kHz audio, seconds into it where each thinking pause ends) of every case."""
    pcm = recording("jfk.flac")
    tone = pcm[int(ROOM_TONE[0] * ASR_RATE) : int(ROOM_TONE[1] * ASR_RATE)]
    cases = []
    for words, parts, pauses in PAUSE_CASES:
        bounds = [list(part) for part in parts]
        for left, right in zip(bounds, bounds[1:], strict=False):
            if left[1] == right[0]:  # a cut inside speech
                left[1] = right[0] = quietest(pcm, left[1])
        pieces, resumes, length = [], [], 0
        for i, (a, b) in enumerate(bounds):
            pieces.append(pcm[int(a * ASR_RATE) : int(b * ASR_RATE)])
            length += len(pieces[-1])
            if i < len(pauses):
                pieces.append(np.resize(tone, int(pauses[i] * ASR_RATE)))
                length += len(pieces[-1])
                if pauses[i] >= THINKING_PAUSE:
                    resumes.append(length / ASR_RATE)
        cases.append((words, np.concatenate(pieces), resumes))
    return cases


def run_paused_sentence(
    ws, speech: np.ndarray, resumes: list[float], trailing_silence: float, transport: Transport
) -> dict:
    """Speak a sentence with pauses in real time; it was cut if the server found more than one turn
    in it. Waits until every turn it found has ended."""
    t_start, sender = start_speaking(ws, speech, trailing_silence, transport)
    arrivals: list[tuple[float, dict | None]] = []  # (perf_counter, event or None for audio)
    while sender.is_alive() or _open_turns(arrivals):
        try:
            message = ws.recv(timeout=0.2)
        except TimeoutError:
            continue
        arrivals.append((time.perf_counter(), None if isinstance(message, bytes) else json.loads(message)))
    sender.join()
    ws.send(json.dumps({"type": "audio_stop"}))
    stops = [t - t_start for t, e in arrivals if e and e["type"] == "speech_stopped"]
    t_speech_end = t_start + speech_end_seconds(speech)
    first_audio = next((t for t, e in arrivals if e is None and t > t_speech_end), None)
    ends = [e for _, e in arrivals if e and e["type"] == "turn_end"]
    return {
        "cut": len(stops) > 1,
        "turn_ends_s": [round(stop, 2) for stop in stops],
        "turns": len(ends),
        "transcripts": [e["text"] for _, e in arrivals if e and e["type"] == "transcript" and e["final"]],
        "voice_to_voice_ms": None if first_audio is None else round((first_audio - t_speech_end) * 1000, 1),
    }


def _open_turns(arrivals: list[tuple[float, dict | None]]) -> bool:
    events = [e["type"] for _, e in arrivals if e]
    return events.count("speech_started") > events.count("turn_end")


# ------------------------------------------------------------ the run


def stage_medians(results: list[dict]) -> dict:
    stages = ("end_of_turn_ms", "transcript_ms", "first_token_ms", "first_phrase_ms", "first_audio_ms")
    out = {}
    for stage in stages:
        values = [r["server"][stage] for r in results if r.get("server", {}).get(stage) is not None]
        out[stage] = statistics.median(values) if values else None
    return out


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def talk(urls: dict[str, str], questions, cases, silence: float, transport_name: str):
    """Speak every question, then every paused sentence, to each rule's server in turn (so both see the
    same machine); returns ({rule: question results}, {rule: paused-sentence results})."""
    transport = TRANSPORTS[transport_name]
    with ExitStack() as stack:
        socks = {rule: stack.enter_context(connect(url, max_size=None)) for rule, url in urls.items()}
        for ws in socks.values():
            ws.recv(timeout=30)  # ready
        results: dict[str, list[dict]] = {rule: [] for rule in socks}
        for text, speech in questions:
            for rule, ws in socks.items():
                r = run_turn(ws, speech, silence, transport)
                r["question"] = text
                results[rule].append(r)
                s = r.get("server", {})
                print(f"{rule}: {r['voice_to_voice_ms']!s:>8} ms | eot {s.get('end_of_turn_ms')} asr "
                      f"{s.get('transcript_ms')} token {s.get('first_token_ms')} phrase {s.get('first_phrase_ms')} "
                      f"audio {s.get('first_audio_ms')} | {r.get('transcript', '')!r}", flush=True)
        paused: dict[str, list[dict]] = {rule: [] for rule in socks}
        for words, speech, resumes in cases:
            for rule, ws in socks.items():
                r = run_paused_sentence(ws, speech, resumes, silence, transport)
                r["sentence"] = words
                paused[rule].append(r)
                verdict = "CUT" if r["cut"] else "whole"
                print(f"{rule}: {verdict} {r['voice_to_voice_ms']!s:>8} ms | {words}", flush=True)
    return results, paused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--silence", type=float, default=2.5, help="seconds sent after speech")
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="ogg",
                        help="the page's WebCodecs Ogg pages (Chromium) or MediaRecorder's WebM (other browsers)")
    parser.add_argument("--out", default="bench-results/latency.json")
    args = parser.parse_args()

    questions = spoken_questions(args.turns)
    cases = pause_cases()
    report: dict = {"transport": args.transport, "questions": {}, "paused_sentences": {}}
    with ExitStack() as stack:
        urls = start_both_rules(args.preset, stack)
        # The talking client runs in a process of its own, as the page runs in the browser's: in this one
        # it would wait for the server's threads at every send and receive (one Python lock for all).
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as client:
            results, paused = client.submit(talk, urls, questions, cases, args.silence, args.transport).result()

    for rule in ("old", "new"):
        report["questions"][rule] = {
            "median_voice_to_voice_ms": median([r["voice_to_voice_ms"] for r in results[rule]]),
            "median_stages_ms": stage_medians(results[rule]),
            "turns": results[rule],
        }
        v2v = median([r["voice_to_voice_ms"] for r in paused[rule] if not r["cut"]])
        report["paused_sentences"][rule] = {
            "cut": sum(r["cut"] for r in paused[rule]),
            "of": len(paused[rule]),
            "median_voice_to_voice_ms_of_whole": v2v,
            "median_added_delay_ms": None if v2v is None else round(
                v2v - report["questions"][rule]["median_voice_to_voice_ms"], 1),
            "sentences": paused[rule],
        }
    old, new = (report["questions"][r]["median_voice_to_voice_ms"] for r in ("old", "new"))
    report["new_over_old"] = round(new / old, 3) if old and new else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for rule in ("old", "new"):
        q, p = report["questions"][rule], report["paused_sentences"][rule]
        print(f"{rule} rule: median voice-to-voice {q['median_voice_to_voice_ms']} ms, stages {q['median_stages_ms']}; "
              f"paused sentences cut {p['cut']}/{p['of']}, added delay {p['median_added_delay_ms']} ms")
    print(f"new/old median voice-to-voice: {report['new_over_old']}")


if __name__ == "__main__":
    main()
