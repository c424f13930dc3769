"""Voice-to-voice as a person hears it: real utterances said into the real page's microphone (headless Chromium,
a fake microphone file), timed from the true end of speech to the first audible sample the page plays, under
the default end-of-turn rule and the old one (a fixed 500 ms of silence, nothing started before it) in one run.

The held-out half's statements and questions of the real-speech turn set (tests/data/turns, without the
inserted thinking pauses) are strung into microphone files of a few (--chunk) each, each recording followed by
enough quiet for its reply to finish (replies are capped at --max-tokens, greedy), so nothing barges in; each
file is said to both rules' pages, the rules taking turns at going first. The page is opened with `?tap`: its
player worklet reports the AudioContext frame of each reply's first sample above -60 dBFS (always on, one
message a reply), and a tap on the microphone in the same AudioContext reports its loudness per 128-frame block.
Both are on one clock. Where each utterance lies on that clock is found by matching the file's loudness to
the tap's (correlation of the dB envelopes, a block's resolution: the page's gain control lifts a quiet start
by 10-20 dB within the first second, so no fixed threshold finds the same onset in both), and checked: the
onset alone, matched the same way, must land within 50 ms of where the whole utterance put it. Not seen by
that clock, so given apart ("unseen"):
the microphone's buffer before the tap (the track's `latency`: Chromium's fake device hands the file over in
10 ms buffers; a probe of AudioData timestamps found the tap ~0-5 ms after a buffer's capture time) and the
output's buffers after the worklet (the context's baseLatency + outputLatency: 10 + 30 ms in headless
Chromium; a probe of getOutputTimestamp() gave ~45 ms). A real microphone and speaker have their own.

    uv run python benchmarks/bench_heard.py --out bench-results/heard.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import wave
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.audio import ASR_RATE, read_audio_file
from benchmarks.bench_latency import start_both_rules
from tests.support import resample

CHROMIUM = "/usr/bin/chromium"
MIC_RATE = 48_000  # what a real microphone gives Chromium
KINDS = ("statement", "question")
BLOCK = 128  # frames an AudioWorklet renders at a time: the tap's resolution
LOUD = 0.01  # -40 dBFS RMS over a block: where the microphone's file first becomes loud, roughly
ONSET = 0.1  # speech has begun at the first block at a tenth of the utterance's loudest (-20 dB)
TAP_TOLERANCE_S = 0.05  # the tap's onset of each utterance must be this close to the file's
ONSET_SPAN_S = (0.15, 0.35)  # the onset, matched on its own: from this long before it to this long after
FIRST_SEARCH_S = 1.5  # how far the first utterance's offset is looked for around the rough one
SEARCH_S = 0.3  # how far each next utterance's offset is looked for around the one before
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]


@dataclass(frozen=True)
class Spoken:
    """One utterance as placed in the microphone file (seconds from the file's start)."""

    id: str
    kind: str
    text: str
    start_s: float
    onset_s: float  # speech begins (ONSET)
    end_s: float  # the manifest's true end of speech


# ------------------------------------------------------------ the utterances and the microphone file


def held_out(manifest: str | None) -> list:
    """Unpaused statements and questions of the held-out half; from `manifest` (same shape as
    tests/data/turns/manifest.json) when given, else from the repository's turn set."""
    if manifest is None:
        from tests.turn_set import load

        return [u for u in load(half="heldout", paused=False) if u.kind in KINDS]
    root = Path(manifest).parent
    entries = json.loads(Path(manifest).read_text())["utterances"]
    return [_Entry(e["id"], read_audio_file(str(root / e["file"]), ASR_RATE), e["kind"], e["text"], e["end_s"])
            for e in entries if e["half"] == "heldout" and e["kind"] in KINDS]


@dataclass(frozen=True)
class _Entry:
    id: str
    audio: np.ndarray
    kind: str
    text: str
    end_s: float


def microphone(utterances: list, lead_s: float, gap_s: float) -> tuple[np.ndarray, list[Spoken]]:
    """The recordings one after another at 48 kHz (their own quiet after the speech included), each
    followed by `gap_s` of silence."""
    pieces, placed, at = [np.zeros(int(lead_s * MIC_RATE), np.float32)], [], lead_s
    for u in utterances:
        speech = resample(u.audio, ASR_RATE, MIC_RATE)
        rms = block_rms(speech[: int(u.end_s * MIC_RATE)], MIC_RATE, BLOCK / MIC_RATE)
        onset = onset_in(rms) * BLOCK / MIC_RATE
        placed.append(Spoken(u.id, u.kind, u.text, at, at + onset, at + u.end_s))
        pieces += [speech, np.zeros(int(gap_s * MIC_RATE), np.float32)]
        at += len(speech) / MIC_RATE + gap_s
    return np.concatenate(pieces), placed


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def block_rms(pcm: np.ndarray, rate: int, block_s: float) -> np.ndarray:
    """RMS of consecutive blocks of `block_s` seconds (the tap's blocks, at the file's own rate)."""
    edges = np.round(np.arange(0, len(pcm) / rate, block_s) * rate).astype(int)
    squares = np.concatenate([[0.0], np.cumsum(pcm.astype(np.float64) ** 2)])
    ends = np.minimum(edges + max(1, round(block_s * rate)), len(pcm))
    return np.sqrt((squares[ends] - squares[edges]) / np.maximum(1, ends - edges))


def first_loud(rms: np.ndarray) -> int:
    loud = np.nonzero(rms > LOUD)[0]
    return int(loud[0]) if len(loud) else 0


def onset_in(rms: np.ndarray) -> int:
    """The first block at ONSET of the loudest."""
    return int(np.argmax(rms >= ONSET * rms.max()))


# ------------------------------------------------------------ the page


def talk_through_page(browser, url: str, seconds: float) -> dict:
    """Open the page with the microphone tap, press the talk button (the fake microphone starts its file),
    wait out the file and the last reply; returns what the page recorded."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(f"{url}/?tap")
        page.get_by_role("button", name="Start talking").click(timeout=60_000)
        page.wait_for_timeout(seconds * 1000)
        page.wait_for_function("() => window.voiceAssistant.state === 'listening'", timeout=120_000)
        return {**page.evaluate("""() => {
          const va = window.voiceAssistant;
          return {heard: va.heard, micLevels: va.micLevels, audioClock: va.audioClock, turnEnds: va.turnEnds,
                  metrics: va.metrics, transcripts: va.transcripts};
        }"""), "console_errors": errors}
    finally:
        page.close()


# ------------------------------------------------------------ one clock: where each utterance lies on it


def tap_envelope(levels: list[dict], rate: float) -> tuple[float, np.ndarray]:
    """(context time of the first block, RMS of every block) from the tap's batches. Blocks the tap was not
    run for (Chromium skips a node whose input has not started yet) count as silence."""
    first = levels[0]["frame"]
    rms = np.zeros((levels[-1]["frame"] - first) // BLOCK + len(levels[-1]["rms"]))
    for batch in levels:
        at = (batch["frame"] - first) // BLOCK
        rms[at : at + len(batch["rms"])] = batch["rms"]
    return first / rate, rms


def decibels(rms: np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.maximum(rms, 1e-4))


def offset_of(file_db: np.ndarray, tap_db: np.ndarray, span: tuple[int, int], guess: int, reach: int) -> int:
    """The shift (in blocks) that best lines up the file's loudness over `span` with the tap's, near `guess`."""
    a, b = span
    best, best_score = guess, -np.inf
    for lag in range(guess - reach, guess + reach + 1):
        if a + lag < 0 or b + lag > len(tap_db):
            continue
        score = np.corrcoef(file_db[a:b], tap_db[a + lag : b + lag])[0, 1]
        if score > best_score:
            best, best_score = lag, score
    return best


def place_on_clock(mic: np.ndarray, spoken: list[Spoken], page: dict) -> list[dict]:
    """For each utterance: its onset and end on the AudioContext's clock, placed by matching its whole
    loudness; and the tap's check: its onset alone, matched the same way, must land in the same place.
    (Loudness in dB, compared by correlation: the page's gain control moves the level, not the shape.)"""
    rate = page["audioClock"]["sampleRate"]
    block_s = BLOCK / rate
    t0, tap = tap_envelope(page["micLevels"], rate)
    file_db, tap_db = decibels(block_rms(mic, MIC_RATE, block_s)), decibels(tap)
    lag = first_loud(tap) - first_loud(block_rms(mic, MIC_RATE, block_s))  # file blocks -> tap's, roughly
    reach, near = int(FIRST_SEARCH_S / block_s), int(SEARCH_S / block_s)
    placed = []
    for s in spoken:
        lag = offset_of(file_db, tap_db, (int((s.onset_s - 0.2) / block_s), int((s.end_s + 0.2) / block_s)),
                        lag, reach)
        reach = near
        onset_span = (int((s.onset_s - ONSET_SPAN_S[0]) / block_s), int((s.onset_s + ONSET_SPAN_S[1]) / block_s))
        onset_lag = offset_of(file_db, tap_db, onset_span, lag, near)
        shift = t0 + lag * block_s  # context time = file time + shift
        placed.append({"onset": s.onset_s + shift, "end": s.end_s + shift, "shift_s": shift,
                       "onset_error_s": (onset_lag - lag) * block_s})
    return placed


# ------------------------------------------------------------ voice-to-voice per utterance


def voice_to_voice(spoken: list[Spoken], placed: list[dict], page: dict) -> list[dict]:
    """Per utterance: the first reply heard after its end (before the next one begins), in ms after the end."""
    heard = sorted(page["heard"], key=lambda h: h["time"])
    metrics = {m["turn"]: m for m in page["metrics"]}
    rows = []
    for i, (s, p) in enumerate(zip(spoken, placed, strict=True)):
        until = placed[i + 1]["onset"] if i + 1 < len(placed) else np.inf
        early = [h for h in heard if p["onset"] < h["time"] <= p["end"]]
        after = next((h for h in heard if p["end"] < h["time"] < until), None)
        rows.append({
            "id": s.id, "kind": s.kind, "text": s.text,
            "heard_ms": None if after is None else round((after["time"] - p["end"]) * 1000, 1),
            "reply_before_end": len(early),  # a turn ended mid-utterance and its reply played over the speaker
            "onset_error_ms": round(p["onset_error_s"] * 1000, 1),
            "clock_shift_ms": round((p["shift_s"] - placed[0]["shift_s"]) * 1000, 1),  # drift, if any
            "server": metrics.get(after["turn"]) if after else None,
        })
    return rows


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summary(rows: list[dict]) -> dict:
    """Median and p90 of the heard voice-to-voice per kind and for all; replies missing, replies that played
    while the person was still speaking (a turn ended mid-utterance), and the server's own medians beside it
    (it counts from where Silero VAD heard the speech end)."""
    out = {}
    for kind in (*KINDS, "all"):
        picked = [r for r in rows if kind == "all" or r["kind"] == kind]
        values = [r["heard_ms"] for r in picked if r["heard_ms"] is not None]
        server = [r["server"] for r in picked if r["server"]]
        out[kind] = {"n": len(picked), "missing": len(picked) - len(values),
                     "median_ms": median(values), "p90_ms": percentile(values, 90),
                     "replied_mid_utterance": sum(r["reply_before_end"] > 0 for r in picked),
                     "server_end_of_turn_median_ms": median([m.get("end_of_turn_ms") for m in server]),
                     "server_first_audio_median_ms": median([m.get("first_audio_ms") for m in server]),
                     # The page's share (jitter buffer, socket) less how late Silero heard the end.
                     "heard_after_server_median_ms": median([r["heard_ms"] - r["server"]["first_audio_ms"]
                                                             for r in picked if r["server"] and r["heard_ms"]])}
    return out


def median(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 1) if kept else None


def tap_check(rows: list[dict]) -> dict:
    """The tap hears every utterance begin where the file says (within TAP_TOLERANCE_S); and how far
    the file's place on the clock moved within a page (the fake device and the context share one clock)."""
    error = max(abs(r["onset_error_ms"]) for r in rows)
    return {"max_onset_error_ms": error, "max_drift_ms": max(abs(r["clock_shift_ms"]) for r in rows),
            "within_ms": TAP_TOLERANCE_S * 1000, "ok": error <= TAP_TOLERANCE_S * 1000}


# ------------------------------------------------------------ the run

RULES = ("new", "old")


def analyse(mic: np.ndarray, spoken: list[Spoken], page: dict) -> dict:
    """What one page recorded -> per utterance rows, and what else it saw."""
    return {"rows": voice_to_voice(spoken, place_on_clock(mic, spoken, page), page),
            "audio_clock": page["audioClock"], "console_errors": page["console_errors"],
            "turn_ends": [e["reason"] for e in page["turnEnds"]], "load_average": page.get("load_average")}


def run_chunk(playwright, urls: dict[str, str], utterances: list, index: int, args) -> dict[str, dict]:
    """A microphone file of a few utterances, said to each rule's page in turn: the rules alternate which goes
    first from chunk to chunk, so both meet the same (shared, changing) load on the machine. What each page
    recorded is kept beside --out; with --from-pages those are read again instead."""
    mic, spoken = microphone(utterances, lead_s=1.0, gap_s=args.gap)
    stem = Path(args.out).with_suffix("")
    raw = {rule: stem.with_name(f"{stem.name}.{rule}{index}.page.json") for rule in RULES}
    if not args.from_pages:
        wav = stem.with_name(f"{stem.name}.mic{index}.wav")
        write_wav(wav, mic, MIC_RATE)
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}%noloop"])
        try:
            for rule in RULES if index % 2 == 0 else RULES[::-1]:
                page = talk_through_page(browser, page_url(urls[rule]), len(mic) / MIC_RATE + 1)
                raw[rule].write_text(json.dumps({**page, "load_average": os.getloadavg()[0]}))
        finally:
            browser.close()
    results = {rule: analyse(mic, spoken, json.loads(raw[rule].read_text())) for rule in RULES}
    for rule in RULES:
        print_rows(rule, results[rule]["rows"])
    return results


def page_url(ws_url: str) -> str:
    return ws_url.replace("ws", "http", 1).removesuffix("/ws")


def print_rows(rule: str, rows: list[dict]) -> None:
    for r in rows:
        s = r["server"] or {}
        print(f"{rule}: {r['heard_ms']!s:>8} ms heard | server eot {s.get('end_of_turn_ms')} audio "
              f"{s.get('first_audio_ms')} | tap {r['onset_error_ms']:+.0f} ms | {r['kind']:9} {r['text'][:50]!r}",
              flush=True)


def report_of(chunks: list[dict[str, dict]], args) -> dict:
    """Every chunk's rows gathered per rule, with the summaries, the tap's check and old/new."""
    rules = {}
    for rule in RULES:
        rows = [row for chunk in chunks for row in chunk[rule]["rows"]]
        ends = [reason for chunk in chunks for reason in chunk[rule]["turn_ends"]]
        clock = chunks[0][rule]["audio_clock"]
        rules[rule] = {"summary": summary(rows), "tap": tap_check(rows), "barge_ins": ends.count("interrupted"),
                       "turns": len(ends), "audio_clock": clock, "unseen_ms": unseen_ms(clock),
                       "load_average": [chunk[rule]["load_average"] for chunk in chunks],
                       "console_errors": [e for chunk in chunks for e in chunk[rule]["console_errors"]],
                       "utterances": rows}
    old, new = (rules[r]["summary"] for r in ("old", "new"))
    return {"settings": {"gap_s": args.gap, "max_tokens": args.max_tokens, "chunk": args.chunk,
                         "manifest": args.manifest or "tests/data/turns"},
            "rules": rules, "old_over_new": {k: ratio(old[k]["median_ms"], new[k]["median_ms"]) for k in new}}


def unseen_ms(clock: dict) -> dict:
    """What lies outside the one clock: the microphone's buffer before the tap, the output's after the worklet."""
    capture = round(1000 * (clock.get("micLatency") or 0), 1)
    output = round(1000 * (clock["baseLatency"] + (clock.get("outputLatency") or 0)), 1)
    return {"capture": capture, "output": output, "total": round(capture + output, 1)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def print_summary(report: dict) -> None:
    for rule in RULES:
        r = report["rules"][rule]
        for kind, s in r["summary"].items():
            print(f"{rule:3} {kind:9}: median {s['median_ms']} ms, p90 {s['p90_ms']} ms heard (n {s['n']}, "
                  f"missing {s['missing']}, replied mid-utterance {s['replied_mid_utterance']}) | server: end of "
                  f"turn {s['server_end_of_turn_median_ms']}, "
                  f"first audio {s['server_first_audio_median_ms']} ms; heard "
                  f"{s['heard_after_server_median_ms']} ms after it")
        print(f"{rule:3} tap check: {r['tap']}; turns {r['turns']}, barge-ins {r['barge_ins']}; "
              f"not seen by the clock: {r['unseen_ms']} ms")
    print(f"old/new median: {report['old_over_new']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--manifest", help="a manifest of the turn set's shape (default: tests/data/turns)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N utterances (0: all)")
    parser.add_argument("--chunk", type=int, default=4, help="utterances per microphone file")
    parser.add_argument("--gap", type=float, default=8.0, help="seconds of quiet after each recording")
    parser.add_argument("--max-tokens", type=int, default=20, help="reply cap, so each ends within the gap")
    parser.add_argument("--out", default="bench-results/heard.json")
    parser.add_argument("--from-pages", action="store_true",
                        help="analyse again what the pages of an earlier run with the same options recorded")
    args = parser.parse_args()

    utterances = held_out(args.manifest)[: args.limit or None]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with ExitStack() as stack:
        urls, playwright = {}, None
        if not args.from_pages:
            urls = start_both_rules(args.preset, stack, {"llm": {"temperature": 0.0, "max_tokens": args.max_tokens}})
            playwright = stack.enter_context(sync_playwright())
        chunks = [run_chunk(playwright, urls, utterances[i : i + args.chunk], i // args.chunk, args)
                  for i in range(0, len(utterances), args.chunk)]
    report = report_of(chunks, args)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_summary(report)


if __name__ == "__main__":
    main()
