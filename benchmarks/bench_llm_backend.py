"""First-audio latency with the language model in process vs on an OpenAI-compatible server, in one run.

Starts llama-cpp-python's own server on the cpu preset's GGUF and two assistant servers on the cpu preset,
one per backend, both models with the same number of threads, then alternates the same turns between
them, spoken (real time, like bench_latency) and typed, so that both see the same machine load:

    uv run python benchmarks/bench_llm_backend.py --turns 6 --threads 1 --out bench-results/llm_backend.json

Prints each turn and the medians, with remote / in-process ratios, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import ExitStack, closing
from pathlib import Path

from bench_latency import QUESTIONS, run_turn, spoken_questions
from bench_soak import typed_turn
from websockets.sync.client import connect

from tests.llm_server import LlamaServer
from tests.support import serving

BACKENDS = ("llama_cpp", "openai")


def start_assistant(environ: dict[str, str], stack: ExitStack) -> str:
    """The cpu preset with these VA_* settings, loaded, warmed and served until `stack` closes; its /ws URL."""
    from app.config import load_settings
    from app.startup import load_and_warm
    from app.web.server import create_app

    settings = load_settings("cpu", environ=environ)
    engines = stack.enter_context(closing(load_and_warm(settings)))
    return stack.enter_context(serving(create_app(settings, engines))).replace("http", "ws", 1) + "/ws"


def one_turn(ws, kind: str, index: int, speech: list, silence: float) -> dict:
    """A spoken turn (first audio after the end of speech) or a typed one (after the text was sent)."""
    if kind == "spoken":
        r = run_turn(ws, speech[index % len(speech)][1], silence)
        server = r.get("server", {})
        heard, first_audio = server.get("transcript_ms"), server.get("first_audio_ms")
        return {"reason": r["reason"], "first_audio_ms": r["voice_to_voice_ms"],
                "server_end_of_turn_ms": server.get("end_of_turn_ms"),
                "server_first_token_ms": server.get("first_token_ms"), "server_first_audio_ms": first_audio,
                # The backend's own share: the end of the turn is decided before the LLM is asked.
                "server_transcript_to_audio_ms": None if heard is None or first_audio is None
                else round(first_audio - heard, 1)}
    r = typed_turn(ws, QUESTIONS[index % len(QUESTIONS)])
    return {"reason": r["reason"], "first_audio_ms": r["first_audio_ms"]}


def median(results: list[dict], backend: str, kind: str, key: str) -> float | None:
    values = [r[key] for r in results if r["backend"] == backend and r["kind"] == kind and r.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def summarise(results: list[dict]) -> dict:
    summary: dict = {}
    spoken = ("first_audio_ms", "server_end_of_turn_ms", "server_first_token_ms", "server_first_audio_ms",
              "server_transcript_to_audio_ms")
    for kind, keys in (("spoken", spoken),
                       ("typed", ("first_audio_ms",))):
        for key in keys:
            local, remote = (median(results, b, kind, key) for b in BACKENDS)
            ratio = round(remote / local, 3) if local and remote else None
            summary[f"{kind}_{key}"] = {"in_process": local, "openai_server": remote, "ratio": ratio}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6, help="turns of each kind (spoken, typed) per backend")
    parser.add_argument("--silence", type=float, default=1.5, help="seconds sent after each spoken question")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads, both models")
    parser.add_argument("--out", type=Path, default=Path("bench-results/llm_backend.json"))
    args = parser.parse_args()
    speech = spoken_questions(len(QUESTIONS))
    results: list[dict] = []
    with ExitStack() as stack:
        server = stack.enter_context(LlamaServer(threads=args.threads))
        threads = {"VA_LLM__N_THREADS": str(args.threads)}
        urls = {"llama_cpp": start_assistant(threads, stack), "openai": start_assistant(server.env(), stack)}
        sockets = {b: stack.enter_context(connect(urls[b], max_size=None)) for b in BACKENDS}
        for ws in sockets.values():
            ws.recv(timeout=30)  # ready
        for kind in ("spoken", "typed"):
            for i in range(args.turns):
                # Alternate which backend goes first, so neither always follows the other's load.
                for backend in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
                    r = {"backend": backend, "kind": kind, **one_turn(sockets[backend], kind, i, speech, args.silence)}
                    results.append(r)
                    print(f"{kind:6} {backend:9} {r['first_audio_ms']!s:>8} ms first audio "
                          f"(server token {r.get('server_first_token_ms')}) {r['reason']}")
                    time.sleep(0.2)
    report = {"turns_per_kind_and_backend": args.turns, "llm_threads": args.threads,
              "summary": summarise(results), "turns": results}
    print(json.dumps(report["summary"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
