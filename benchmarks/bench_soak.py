"""Soak: N well-behaved sessions x M turns (typed and spoken, alternating) at once, beside a flood
client (texts and junk as fast as it can send them) and a client that never reads. Writes JSON:
turns completed, errors, p50/p95 first audio of the well-behaved sessions, server RSS before/after.

    uv run python benchmarks/bench_soak.py --sessions 3 --turns 4 --out bench-results/soak.json
    uv run python benchmarks/bench_soak.py --attacks --turns 0 --out bench-results/attacks.json

`--attacks` first sends each attack of benchmarks/attacks.py to the same models served as `serve --lan` serves
them, and prints and reports what held (the command exits 1 if any did not).

The server runs in this process (cpu preset), so RSS is this process's: server plus clients. Its language
model is in process unless the VA_LLM__* variables point it at an OpenAI-compatible server, or
`--llm-server` starts llama-cpp-python's own server on the cpu preset's GGUF (a process of its own) and
points it there; the report names the backend either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack, closing
from pathlib import Path

import attacks
import msgspec
from bench_latency import QUESTIONS, listen_to_turn, run_turn, serve, spoken_questions
from websockets.sync.client import connect

from app.config import load_settings
from app.startup import load_and_warm
from tests.llm_server import LlamaServer
from tests.support import raw_client, send_text_frame

STORY = "Tell me a very long story about a brave little dragon and all of its friends."


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def typed_turn(ws, text: str) -> dict:
    """Send `text`; time to the first reply audio received; events until turn_end."""
    t_sent = time.perf_counter()
    ws.send(json.dumps({"type": "text", "text": text}))
    first_audio, events = listen_to_turn(ws)
    ms = None if first_audio is None else round((first_audio - t_sent) * 1000, 1)
    errors = [e["code"] for e in events if e["type"] == "error"]
    return {"reason": events[-1]["reason"], "first_audio_ms": ms, "errors": errors}


def well_behaved(url: str, session: int, turns: int, speech: list, results: list) -> None:
    with connect(url, max_size=None) as ws:
        ws.recv(timeout=30)  # ready
        for i in range(turns):
            if i % 2:
                r = run_turn(ws, speech[i % len(speech)][1], 1.0)
                r = {"kind": "spoken", "reason": r["reason"], "first_audio_ms": r["voice_to_voice_ms"],
                     "errors": [], "server": r.get("server")}
            else:
                r = {"kind": "typed", **typed_turn(ws, QUESTIONS[i % len(QUESTIONS)])}
            r["session"], r["turn"] = session, i
            results.append(r)


def flood(url: str, stop: threading.Event, stats: Counter) -> None:
    """Texts, malformed messages and junk audio as fast as it can, reading everything it gets."""
    with connect(url, max_size=None) as ws:
        reader = threading.Thread(target=_drain, args=(ws, stats), daemon=True)
        reader.start()
        while not stop.is_set():
            for message in ({"type": "text", "text": "Hi!"}, "{not json", {"type": "text", "text": "x" * 3000}):
                ws.send(message if isinstance(message, str) else json.dumps(message))
                stats["sent"] += 1
            ws.send(b"\x1a\x45\xdf\xa3 junk" * 100)
            stats["sent"] += 1
            time.sleep(0.02)


def never_reads(url: str, stop: threading.Event, stats: Counter) -> None:
    """Asks for a long story every 3 s (each cuts the last one off) and reads nothing, ever; notes
    when the server closes on it (uvicorn's keep-alive ping goes unanswered: about 40 s)."""
    silent = raw_client(url.replace("ws", "http", 1).removesuffix("/ws"))
    t0 = time.perf_counter()
    try:
        while not stop.is_set():
            send_text_frame(silent, json.dumps({"type": "text", "text": STORY}))
            stats["stories_asked"] += 1
            stop.wait(3)
    except OSError:
        stats["closed_by_server_after_s"] = round(time.perf_counter() - t0)
    finally:
        silent.close()


def _drain(ws, stats: Counter) -> None:
    try:
        while True:
            message = ws.recv()
            if isinstance(message, str) and (event := json.loads(message))["type"] == "error":
                stats[f"error:{event['code']}"] += 1
    except Exception:
        return


def _http(ws_url: str) -> str:
    return ws_url.replace("ws", "http", 1).removesuffix("/ws")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1) if len(values) > 1 else values[0]


def attack_target(engines, settings, stack: ExitStack, idle_s: int) -> attacks.Target:
    """The models served again as `serve --lan` serves them (all interfaces, HTTPS, pairing, the access log
    without tokens), bound to loopback, with loopback clients untrusted and sessions idle after `idle_s`."""
    import msgspec

    from app.web import lan
    from app.web.access import hide_tokens_in_access_log
    from app.web.devices import open_pairing
    from app.web.server import create_app
    from tests.support import serving

    folder = attacks.private(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tls")
    tls, pairing = lan.ensure_certificate(folder), open_pairing(folder)
    settings = msgspec.structs.replace(
        settings, host=lan.ALL_INTERFACES,
        access=msgspec.structs.replace(settings.access, trust_loopback=False),
        limits=msgspec.structs.replace(settings.limits, idle_timeout_s=idle_s))
    app = create_app(settings, engines, pairing=pairing, fingerprint=lan.fingerprint(tls.cert))
    url = stack.enter_context(serving(app, log_level="info", access_log=True, **lan.uvicorn_tls(tls)))
    hide_tokens_in_access_log()
    access_log = attacks.AccessLog()
    logging.getLogger("uvicorn.access").addHandler(access_log)
    return attacks.Target(url, pairing.token, folder, access_log.lines, msgspec.structs.asdict(settings.limits),
                          settings.turns.max_turn_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--calm", action="store_true", help="without the flood and the non-reading client")
    parser.add_argument("--llm-server", action="store_true",
                        help="the language model on llama-cpp-python's server (backend openai), started here")
    parser.add_argument("--llm-threads", type=int, help="that server's threads (default: all cores)")
    parser.add_argument("--attacks", action="store_true", help="first send the attacks of benchmarks/attacks.py")
    parser.add_argument("--idle-s", type=int, default=30, help="the attacked server's idle timeout (seconds)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    args = parser.parse_args()
    speech = spoken_questions(len(QUESTIONS))
    with ExitStack() as stack:
        llm_server = stack.enter_context(LlamaServer(threads=args.llm_threads)) if args.llm_server else None
        if llm_server is not None:  # load_settings reads the VA_* environment
            os.environ.update(llm_server.env())
        settings = load_settings("cpu")
        engines = stack.enter_context(closing(load_and_warm(settings)))
        held = attacks.run(attack_target(engines, settings, stack, args.idle_s)) if args.attacks else []
        # Every client here shares one address (loopback): as many sessions as the server holds may be its.
        limits = msgspec.structs.replace(settings.limits, max_sessions_per_client=settings.limits.max_sessions)
        url = serve(engines, msgspec.structs.replace(settings, limits=limits), stack)
        health = json.loads(urllib.request.urlopen(_http(url) + "/health").read())
        rss_before = rss_mb()
        stop, flood_stats, silent_stats = threading.Event(), Counter(), Counter()
        abusers = [threading.Thread(target=flood, args=(url, stop, flood_stats), daemon=True),
                   threading.Thread(target=never_reads, args=(url, stop, silent_stats), daemon=True)]
        for a in abusers if not args.calm else []:
            a.start()
        results: list[dict] = []
        t0 = time.perf_counter()
        clients = [threading.Thread(target=well_behaved, args=(url, n, args.turns, speech, results))
                   for n in range(args.sessions)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        elapsed = time.perf_counter() - t0
        stop.set()
        for a in abusers if not args.calm else []:
            a.join(10)
        metrics = urllib.request.urlopen(_http(url) + "/metrics").read().decode()
        rss_after = rss_mb()
        llm_rss = None if llm_server is None else rss_mb(llm_server.pid)
    first = [r["first_audio_ms"] for r in results if r["first_audio_ms"] is not None]
    report = {
        "sessions": args.sessions, "abusers": not args.calm, "turns_per_session": args.turns,
        "llm": health["llm"], "llm_backend": health["llm_backend"],
        "seconds": round(elapsed, 1),
        "turns_expected": args.sessions * args.turns,
        "turns_completed": sum(r["reason"] == "completed" for r in results),
        "turn_reasons": dict(Counter(r["reason"] for r in results)),
        "errors": dict(Counter(code for r in results for code in r["errors"])),
        "first_audio_ms_p50": percentile(first, 50), "first_audio_ms_p95": percentile(first, 95),
        "flood": dict(flood_stats), "non_reader": dict(silent_stats),
        "dropped_audio_replies": sum(float(line.split()[1]) for line in metrics.splitlines()
                                     if line.startswith("voice_dropped_audio_total")),
        "rss_mb_before": rss_before, "rss_mb_after": rss_after, "llm_server_rss_mb_after": llm_rss,
        "turns": sorted(results, key=lambda r: (r["session"], r["turn"])),
        "attacks": [msgspec.structs.asdict(outcome) for outcome in held],
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if held:
        print(f"attacks held: {sum(o.held for o in held)} of {len(held)}")
    if not all(o.held for o in held):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
