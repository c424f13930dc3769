"""Whisper on a window fitted to the turn (asr.fit_window_s) against faster-whisper's whole 30 s
window: the time of one transcript and the word error rate against the words really said, on the same
turns. The turns: spoken questions and requests (Piper, three renditions each: Piper samples its
noise) and cuts of the real JFK recording whose words are known. Prints both and their ratio, and
writes JSON:

    uv run python benchmarks/bench_asr.py --out bench-results/asr.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import msgspec
import numpy as np

from app.audio import ASR_RATE, read_audio_file
from app.engines.asr import AsrSettings, Transcriber
from tests.support import speak, word_error_rate

SPOKEN = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Can you suggest a name for a black cat?",
    "Why is the sky blue?",
    "I would like a table for two at eight tonight, please.",
    "Set a timer for ten minutes.",
    "Hello.",
    "Tell me about the moon.",
]
# JFK's speech in tests/data/jfk.flac (seconds) and what he says there.
JFK_CUTS = [
    ((0.0, 2.4), "And so my fellow Americans"),
    ((3.2, 7.8), "ask not what your country can do for you"),
    ((8.1, 11.0), "ask what you can do for your country"),
    ((0.0, 11.0), "And so my fellow Americans, ask not what your country can do for you, "
                  "ask what you can do for your country."),
]


def turns(renditions: int) -> list[tuple[str, np.ndarray]]:
    from app.engines.tts.piper import PiperEngine, PiperSettings

    voice = PiperEngine.load(PiperSettings())
    spoken = [(text, speak(voice, text, ASR_RATE)) for text in SPOKEN for _ in range(renditions)]
    jfk = read_audio_file(str(Path(__file__).parent.parent / "tests" / "data" / "jfk.flac"))
    cuts = [(text, jfk[int(a * ASR_RATE) : int(b * ASR_RATE)]) for (a, b), text in JFK_CUTS]
    return spoken + cuts


def measure(asr: Transcriber, clips: list[tuple[str, np.ndarray]]) -> dict:
    rows = []
    for truth, audio in clips:
        t0 = time.perf_counter()
        heard = asr.transcribe(audio)
        rows.append({"truth": truth, "heard": heard, "ms": round((time.perf_counter() - t0) * 1000, 1),
                     "wer": round(word_error_rate(heard, truth), 3)})
    return {"median_ms": statistics.median(r["ms"] for r in rows),
            "mean_wer": round(statistics.mean(r["wer"] for r in rows), 4), "turns": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renditions", type=int, default=3)
    parser.add_argument("--out", default="bench-results/asr.json")
    args = parser.parse_args()

    fitted = Transcriber.load(AsrSettings())
    whole = Transcriber(msgspec.structs.replace(fitted.settings, fit_window_s=0.0), fitted._model)
    clips = turns(args.renditions)
    fitted.warm_up()
    report = {}
    for name, asr in (("whole", whole), ("fitted", fitted), ("whole_again", whole), ("fitted_again", fitted)):
        report[name] = measure(asr, clips)  # twice each, alternating: both see the same machine
        print(f"{name:>12}: median {report[name]['median_ms']:6.1f} ms per transcript, "
              f"mean word error rate {report[name]['mean_wer']:.3f}")
    for a, b in zip(report["whole"]["turns"], report["fitted"]["turns"], strict=True):
        if a["heard"] != b["heard"]:
            print(f"  whole {a['heard']!r} | fitted {b['heard']!r}")
    ratio = statistics.median([report["fitted"]["median_ms"], report["fitted_again"]["median_ms"]]) / \
        statistics.median([report["whole"]["median_ms"], report["whole_again"]["median_ms"]])
    report["fitted_over_whole_time"] = round(ratio, 3)
    print(f"fitted/whole median time: {ratio:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
