"""Turn-taking on real human speech, offline: every end-of-turn rule over the repo's turn set
(tests/data/turns, read by tests/turn_set.py) in one run.

Each utterance, coded as the page sends it (Ogg/Opus), streams through the real detector (Silero VAD,
app/core/turns.py), then 3 s of quiet. Every
silence in it long enough to start speculation (speculate_ms) is a gap, and for each gap the real models
give what the rules read: Smart Turn's probability that the turn is finished, from the sound
(app/engines/smart_turn.py), and the cpu preset's LLM's, from the words Whisper heard
(end_of_turn_probability), with the time each took here. A rule says after how much silence a gap ends the
turn. The first gap that lasts that long (counting the wait for the model it asked) ends it: if speech
follows, the utterance was cut; if it is the last gap, the added delay is that moment minus the true end
of speech. Cut utterances have no added delay.

The rules: "silence" (a fixed 500 ms, the old default), "sound" (Smart Turn alone at a 200 ms pause, at 0.5),
"words" (the LLM alone there, at 0.1: the rule tuned on synthetic questions; both wait 1.6 s otherwise),
"default-sound" (app/core/end_rule.py without the words: the gpu preset's) and "default" (end_rule.py as
the listener runs it on the cpu preset). Per kind (question, statement, command, paused) and overall, for each
half: the median and p90 added delay and the cuts. Then, per half, the "floor": the least median and p90 delay per
kind that any rule reading only these two verdicts can reach without cutting an unpaused utterance (see
zero_cut_floor). JSON to --out; the last line is the default rule on the held-out half.

    uv run python benchmarks/bench_turns.py --out bench-results/turns.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import numpy as np

from app.audio import ASR_RATE, read_audio_file
from app.config import Settings, load_settings
from app.core.end_rule import EndRule
from app.core.turns import Event, TurnDetector, TurnSettings
from app.engines.asr import Transcriber
from app.engines.llm import ChatModel
from app.engines.smart_turn import SmartTurn
from app.engines.vad import WINDOW, StreamingVad, load_vad_model
from tests.support import encode_ogg_opus
from tests.turn_set import Utterance, load

QUIET_AFTER_S = 3.0  # after every utterance: longer than any rule waits
CATEGORIES = ("question", "statement", "command", "paused")


@dataclass
class Gap:
    start_s: float  # where the detector heard the speech stop (stream time)
    length_s: float  # how long the quiet lasted (inf: the last gap)
    sound: float  # Smart Turn's probability that the turn is finished
    words: float  # the LLM's, from the transcript of the turn so far
    text: str
    sound_ms: float  # how long each took to compute here
    words_ms: float


@dataclass
class Result:
    cut: bool
    delay_ms: float | None  # None when cut


# A rule: from a gap, (the silence in s after which it ends the turn, whether it waits for Smart Turn, and
# whether for the words), with the settings it runs under.
Rule = Callable[[Gap], tuple[float, bool, bool]]
# The rules main had before this calibration: a 200 ms pause judged by one model, else 1.6 s of silence.
BEFORE = TurnSettings(pause_ms=200, end_silence_ms=1600)


def rules(turns: TurnSettings) -> dict[str, tuple[Rule, TurnSettings]]:
    pause, longest = BEFORE.pause_ms / 1000, BEFORE.end_silence_ms / 1000
    fused, by_sound = EndRule(turns), EndRule(msgspec.structs.replace(turns, decide_by="sound"))
    return {
        "silence": (lambda gap: (0.5, False, False), BEFORE),
        "sound": (lambda gap: (pause if gap.sound >= 0.5 else longest, True, False), BEFORE),
        "words": (lambda gap: (pause if gap.words >= 0.1 else longest, False, True), BEFORE),
        # The gpu preset's rule, and the one for an LLM on a server: Smart Turn and the silence.
        "default-sound": (lambda gap: (by_sound.silence_needed_ms(gap.sound, None) / 1000, True, False), turns),
        "default": (lambda gap: _fused(fused, gap), turns),
    }


def _fused(rule: EndRule, gap: Gap) -> tuple[float, bool, bool]:
    """The listener's rule: a sure sound ends the turn without the words; anything else waits for them."""
    sure = rule.silence_needed_ms(gap.sound, None, words_due=True) < math.inf
    needed = rule.silence_needed_ms(gap.sound, None if sure else gap.words)
    return needed / 1000, True, not sure


def outcome(gaps: list[Gap], end_s: float, rule: Rule, turns: TurnSettings) -> Result:
    for gap in gaps:
        needed, by_sound, by_words = rule(gap)
        # The listener runs Smart Turn at pause_ms and reads the words when the transcript and the LLM are
        # done, which speculation starts at speculate_ms: a rule waits for the verdicts it asked for.
        at = max(needed, turns.pause_ms / 1000 + gap.sound_ms / 1000 if by_sound else 0.0,
                 turns.speculate_ms / 1000 + gap.words_ms / 1000 if by_words else 0.0)
        if at <= gap.length_s:
            if math.isinf(gap.length_s):
                return Result(False, round((gap.start_s + at - end_s) * 1000, 1))
            return Result(True, None)
    raise AssertionError("the last gap is endless: every rule ends it")


class Judges:
    """The real models, as the listener and the conversation run them."""

    def __init__(self, turns: TurnSettings, vad, smart_turn: SmartTurn, asr: Transcriber, llm: ChatModel) -> None:
        self.turns = msgspec.structs.replace(turns, end_silence_ms=int(QUIET_AFTER_S * 1000) - 200)
        self.vad, self.smart_turn, self.asr, self.llm = vad, smart_turn, asr, llm

    @classmethod
    def load(cls, settings: Settings) -> Judges:
        return cls(settings.turns, load_vad_model(), SmartTurn(), Transcriber.load(settings.asr),
                   ChatModel.load(settings.llm))

    def gaps(self, utterance: Utterance) -> list[Gap]:
        found: list[Gap] = []
        for event, at_s, candidate in self._stream(as_sent(utterance.audio)):
            if event is Event.QUIET:
                found.append(self._judge(candidate, at_s))
            elif event is Event.RESUMED:
                found[-1].length_s = at_s - found[-1].start_s
        found[-1].length_s = math.inf
        return found

    def _stream(self, audio: np.ndarray) -> Iterator[tuple[Event, float, np.ndarray | None]]:
        """(event, stream time, candidate turn) for QUIET (time: where the speech stopped) and RESUMED
        (time: where the quiet stopped), as the listener sees them, one VAD window at a time."""
        detector = TurnDetector(self.turns, StreamingVad(self.vad))
        audio = np.concatenate([audio, np.zeros(int(QUIET_AFTER_S * ASR_RATE), np.float32)])
        for start in range(0, len(audio) - WINDOW + 1, WINDOW):
            for event in detector.feed(audio[start : start + WINDOW]):
                if event is Event.QUIET:
                    candidate, speech_end = detector.candidate()
                    yield event, speech_end / ASR_RATE, candidate
                elif event is Event.RESUMED:
                    yield event, (detector.position - WINDOW) / ASR_RATE, None

    def _judge(self, candidate: np.ndarray, speech_end_s: float) -> Gap:
        t0 = time.perf_counter()
        sound = self.smart_turn.probability(candidate)
        t1 = time.perf_counter()
        text = self.asr.transcribe(candidate)
        words = self.llm.end_of_turn_probability(self.llm.build_messages([], text)) if text else 0.0
        t2 = time.perf_counter()
        return Gap(speech_end_s, 0.0, sound, words, text, (t1 - t0) * 1000, (t2 - t1) * 1000)


def as_sent(audio: np.ndarray) -> np.ndarray:
    """`audio` as the server hears it from the page: Ogg/Opus at 32 kbit/s in 20 ms packets (static/audio.js),
    decoded. The codec moves Smart Turn's verdicts (by 1.7 in logit on average, measured on the tuning half)."""
    data = b"".join(encode_ogg_opus(audio, ASR_RATE))
    return read_audio_file(io.BytesIO(data), ASR_RATE)[: len(audio)]  # type: ignore[arg-type]


def zero_cut_floor(utterances: list[Utterance], gaps: dict[str, list[Gap]]) -> dict[str, dict]:
    """A bound, per kind of finished utterance: the least median and p90 added delay that ANY rule reading
    only these two verdicts can reach without cutting an unpaused utterance, if it never waits less for a
    pause that both verdicts find less finished. Such a rule must outwait every pause inside a sentence
    (its length, and the window that notices it), so each finished sentence that looks no more finished
    (sound and words no higher) than one of those pauses waits at least as long; model time is left out."""
    inside = [g for u in utterances if not u.paused for g in gaps[u.id][:-1]]
    waits: dict[str, list[float]] = {}
    for u in utterances:
        if u.paused:
            continue
        end = gaps[u.id][-1]
        wait = max([g.length_s + WINDOW / ASR_RATE for g in inside if end.sound <= g.sound and end.words <= g.words],
                   default=0.0)
        waits.setdefault(u.kind, []).append((end.start_s + wait - u.end_s) * 1000)
    return {kind: {"median_ms": round(statistics.median(w)), "p90_ms": round(float(np.percentile(w, 90)))}
            for kind, w in sorted(waits.items())}


def summary(results: list[tuple[Utterance, Result]]) -> dict:
    delays = [r.delay_ms for _, r in results if r.delay_ms is not None]
    return {
        "n": len(results),
        "cut": sum(r.cut for _, r in results),
        "median_ms": round(statistics.median(delays)) if delays else None,
        "p90_ms": round(float(np.percentile(delays, 90))) if delays else None,
    }


def table(name: str, half: str, results: list[tuple[Utterance, Result]]) -> dict:
    by_category = {c: summary([x for x in results if x[0].category == c]) for c in CATEGORIES}
    by_category["all"] = summary(results)
    cells = "  ".join(f"{c} {s['median_ms']}/{s['p90_ms']} cut {s['cut']}/{s['n']}" for c, s in by_category.items())
    print(f"{name:8s} {half:8s} {cells}")
    return by_category


def markdown(rules_report: dict) -> str:
    """One table per half: a row per rule, a column per kind, "median / p90 ms, cut n of N" in each."""
    lines = []
    for half in ("heldout", "tune"):
        lines += ["", f"**{'Held-out' if half == 'heldout' else 'Tuning'} half** (median / p90 added delay, cut)", "",
                  "| rule | " + " | ".join((*CATEGORIES, "all")) + " |", "| --- |" + " --- |" * (len(CATEGORIES) + 1)]
        for name, halves in rules_report.items():
            cells = [(f"{s['median_ms']} / {s['p90_ms']} ms, " if s["median_ms"] is not None else "all cut: ")
                     + f"{s['cut']} of {s['n']}" for s in halves[half].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--gaps", type=Path, help="reuse (or save) the models' verdicts per gap, JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the tables for the README")
    args = parser.parse_args()
    settings = load_settings("cpu", environ={})
    utterances = load()
    cached = json.loads(args.gaps.read_text()) if args.gaps and args.gaps.exists() else {}
    if missing := [u for u in utterances if u.id not in cached]:
        judges = Judges.load(settings)
        for i, u in enumerate(missing):
            cached[u.id] = [asdict(g) for g in judges.gaps(u)]
            print(f"{i + 1}/{len(missing)} {u.id}: {len(cached[u.id])} gaps", flush=True)
        if args.gaps:
            args.gaps.write_text(json.dumps(cached))
    gaps = {uid: [Gap(**g) for g in found] for uid, found in cached.items()}
    report: dict = {"rules": {}, "utterances": len(utterances)}
    print("rule     half     kind median/p90 ms, cut")
    for name, (rule, turns) in rules(settings.turns).items():
        report["rules"][name] = {}
        for half in ("tune", "heldout"):
            results = [(u, outcome(gaps[u.id], u.end_s, rule, turns)) for u in utterances if u.half == half]
            report["rules"][name][half] = table(name, half, results)
    report["zero_cut_floor"] = {}
    for half in ("tune", "heldout"):
        floor = report["zero_cut_floor"][half] = zero_cut_floor([u for u in utterances if u.half == half], gaps)
        print(f"floor    {half:8s} no unpaused cut, any rule of these verdicts: " +
              "  ".join(f"{kind} {f['median_ms']}/{f['p90_ms']}" for kind, f in floor.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.markdown:
        print(markdown(report["rules"]))
    held = report["rules"]["default"]["heldout"]
    paused = held["paused"]
    unpaused_n = sum(held[c]["n"] for c in CATEGORIES if c != "paused")
    unpaused_cut = sum(held[c]["cut"] for c in CATEGORIES if c != "paused")
    print(f"turns: median added delay {held['all']['median_ms']} ms, p90 {held['all']['p90_ms']} ms, "
          f"cut {paused['cut']} of {paused['n']} paused, {unpaused_cut} of {unpaused_n} unpaused cut")


if __name__ == "__main__":
    main()
