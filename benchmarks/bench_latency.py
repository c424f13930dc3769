"""Voice-to-voice latency of whole spoken turns, measured like a browser would experience it.

Streams spoken questions as WebM/Opus in real time (100 ms pieces) over the WebSocket, and
times end of the user's speech -> first reply PCM received. Prints a table and the median,
and writes JSON. By default it starts the app in-process on the cpu preset:

    uv run python benchmarks/bench_latency.py --turns 5 --out bench-results/latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
from websockets.sync.client import connect

from app.audio import ASR_RATE, read_audio_file
from tests.support import encode_webm_opus, serving, speak

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you suggest a name for a black cat?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
]


def spoken_questions(n: int) -> list[tuple[str, np.ndarray]]:
    """The questions spoken by Piper's joe voice, at 16 kHz."""
    from app.tts.piper import PiperEngine, PiperSettings

    voice = PiperEngine.load(PiperSettings())
    return [(text, speak(voice, text, ASR_RATE)) for text in (QUESTIONS * n)[:n]]


def start_local_server(preset: str, stack: ExitStack) -> str:
    """Load the preset and serve it in this process until `stack` closes; returns its /ws URL."""
    from app.config import load_settings
    from app.server import create_app
    from app.startup import load_and_warm

    settings = load_settings(preset)
    engines = stack.enter_context(closing(load_and_warm(settings)))
    base = stack.enter_context(serving(create_app(settings, engines)))
    return base.replace("http", "ws", 1) + "/ws"


def speech_end_seconds(pcm: np.ndarray) -> float:
    """End of the last 10 ms frame louder than -40 dBFS: where the talker actually stopped."""
    frames = pcm[: len(pcm) // 160 * 160].reshape(-1, 160)
    loud = np.nonzero(np.sqrt((frames**2).mean(axis=1)) > 0.01)[0]
    return (loud[-1] + 1) * 160 / ASR_RATE if len(loud) else 0.0


def send_in_real_time(ws, pieces: list[bytes], t_start: float) -> None:
    for i, piece in enumerate(pieces):  # piece i exists once (i+1) * 100 ms have been spoken
        time.sleep(max(0.0, t_start + (i + 1) * 0.1 - time.perf_counter()))
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


def run_turn(ws, speech: np.ndarray, trailing_silence: float) -> dict:
    """Speak one turn in real time while listening; return client- and server-side timings."""
    audio = np.concatenate([speech, np.zeros(int(trailing_silence * ASR_RATE), np.float32)])
    pieces = encode_webm_opus(audio, ASR_RATE, piece_ms=100)
    ws.send(json.dumps({"type": "audio_start"}))
    t_start = time.perf_counter()
    sender = threading.Thread(target=send_in_real_time, args=(ws, pieces, t_start))
    sender.start()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="ws://host:port/ws of a running server (default: start one)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--wav", help="speak this recording every turn instead of the questions")
    parser.add_argument("--silence", type=float, default=2.0, help="seconds sent after speech")
    parser.add_argument("--out", default="bench-results/latency.json")
    args = parser.parse_args()

    if args.wav:
        turns = [(Path(args.wav).name, read_audio_file(args.wav))] * args.turns
    else:
        turns = spoken_questions(args.turns)
    with ExitStack() as stack:
        url = args.url or start_local_server(args.preset, stack)
        results = run_turns(url, turns, args.silence)
    v2v = [r["voice_to_voice_ms"] for r in results if r["voice_to_voice_ms"] is not None]
    server = [r["server"]["first_audio_ms"] for r in results if r.get("server", {}).get("first_audio_ms")]
    summary = {
        "turns": len(results),
        "median_voice_to_voice_ms": statistics.median(v2v) if v2v else None,
        "median_server_first_audio_ms": statistics.median(server) if server else None,
        "end_silence_ms_included": True,
    }
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "turns": results}, indent=2))


if __name__ == "__main__":
    main()
