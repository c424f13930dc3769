"""What the cpu preset's replies say, old rule against new, in one run: do they copy the user's sentence,
are they empty or not English, do known questions get their answer, and how soon is the first phrase ready.

The sentences: every distinct transcript of the real-speech set (tests/data/turns, its manifest) and
questions with one right answer (capitals, simple arithmetic, days of the week). Each is a new conversation
(no history). Both rules run on their own llama.cpp context over the same weights, each warmed up as the
server does (its fixed prompt evaluated ahead), and take turns on each sentence, first one then the other,
so that both see the same machine load. The rules:

- old: the system prompt and the one example exchange from before issue 31, no block;
- new: the preset as it is (app/engines/llm.py: its example exchanges and the no-copy block);
- with --sweep 2,3,5: the new prompt with the block at those lengths (0: the prompt alone), to choose N.

A reply copies when it holds 4 or more consecutive words of the user's sentence (app/engines/no_copy.py's
word runs). First phrase: from asking for the reply (the user's words still to evaluate) to the first
phrase the chunker (app/core/chunking.py) cuts, generated in slices as the server does. With --cold N, the
first N sentences are also answered once with the context emptied first: what the prompt's length would
cost if it were not evaluated ahead.

    uv run python benchmarks/bench_replies.py --out bench-results/replies.json

JSON to --out; the last line is the summary the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import msgspec

from app.config import load_settings
from app.core.chunking import PhraseChunker
from app.engines.llm import ChatModel, LlmSettings
from app.engines.no_copy import longest_shared_run, words

TURNS = Path(__file__).parent.parent / "tests" / "data" / "turns" / "manifest.json"
COPY_WORDS = 4  # a reply with this many consecutive words of the user's sentence copies it
OLD_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Always answer in English, in one or two short "
    "sentences. Your words are spoken aloud: no lists, no markdown, no emoji."
)
OLD_EXAMPLE = ("What is the tallest mountain?", "Mount Everest, at 8,849 meters.")
# (question, its right answers: any of these words in the reply)
KNOWN = [
    ("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"), ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"), ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Russia?", "moscow"), ("What is the capital of England?", "london"),
    ("What is two plus two?", "four 4"), ("What is three plus four?", "seven 7"),
    ("What is ten minus three?", "seven 7"), ("What is five plus five?", "ten 10"),
    ("What is two times three?", "six 6"), ("What is one plus one?", "two 2"),
    ("What is nine minus four?", "five 5"), ("What is six plus two?", "eight 8"),
    ("What day comes after Monday?", "tuesday"), ("What day comes after Friday?", "saturday"),
    ("What day comes before Sunday?", "saturday"), ("What day comes before Wednesday?", "tuesday"),
    ("How many days are in a week?", "seven 7"), ("What day comes after Saturday?", "sunday"),
    ("What day comes before Friday?", "thursday"), ("What day comes after Wednesday?", "thursday"),
]
# Frequent words of French, Spanish, Italian and German that English does not use: what SmolLM2-135M drifts into.
FOREIGN = set("le les une est des du et sont pour avec el los las una es por con il della und der die das ist"
              " nicht ein eine mit".split())


class Sentence(msgspec.Struct, frozen=True):
    text: str
    kind: str  # question, statement or command (the manifest's), or "known" (a question with one answer)
    answers: tuple[str, ...] = ()


def sentences() -> list[Sentence]:
    heard = json.loads(TURNS.read_text())["utterances"]
    seen: dict[str, Sentence] = {}
    for entry in heard:
        seen.setdefault(entry["text"], Sentence(entry["text"], entry["kind"]))
    return [*seen.values(), *(Sentence(q, "known", tuple(a.split())) for q, a in KNOWN)]


def rules(preset: LlmSettings, sweep: list[int]) -> dict[str, LlmSettings]:
    out = {
        "old": msgspec.structs.replace(preset, system_prompt=OLD_SYSTEM_PROMPT, example=OLD_EXAMPLE,
                                       no_copy_words=0),
        "new": preset,
    }
    for n in sweep:
        out[f"new-n{n}"] = msgspec.structs.replace(preset, no_copy_words=n)
    return out


def reply(chat: ChatModel, text: str, temperature: float | None, cold: bool = False) -> dict:
    """One reply as the server writes it (slices of slice_tokens), with its first token and phrase times."""
    if cold:
        chat._llama.reset()  # nothing held: the whole prompt is evaluated within this reply's time
    t0 = time.perf_counter()
    prompt = chat.prompt(chat.build_messages([], text))
    chunker, written, marks = PhraseChunker(), "", {}
    used, size, budget, finished = 0, chat.settings.slice_tokens, chat.settings.max_tokens, False
    while not finished and used < budget:
        n, got = min(size, budget - used), 0
        for piece, stop in chat.stream_slice(prompt, written, max_new=n, temperature=temperature):
            marks.setdefault("first_token", time.perf_counter())
            written, got, finished = written + piece, got + 1, finished or stop
            if chunker.push(piece):
                marks.setdefault("first_phrase", time.perf_counter())
        used, finished = used + got, finished or got < n
    if chunker.flush():
        marks.setdefault("first_phrase", time.perf_counter())
    marks["done"] = time.perf_counter()
    ms = {name: round((t - t0) * 1000, 1) for name, t in marks.items()}
    return {"reply": written.strip(), "first_token_ms": ms.get("first_token"),
            "first_phrase_ms": ms.get("first_phrase"), "total_ms": ms["done"], "tokens": used}


def judge(sentence: Sentence, text: str) -> dict:
    said = words(text)
    foreign = sum(w in FOREIGN or not w.isascii() for w in said)
    return {
        "run": longest_shared_run(text, sentence.text),
        "copy": longest_shared_run(text, sentence.text) >= COPY_WORDS,
        "empty": not said,
        "non_english": foreign >= 2 or (said and foreign / len(said) > 0.2),
        "right": bool(set(sentence.answers) & set(said)) if sentence.answers else None,
    }


def pct(part: int, whole: int) -> float:
    return round(100 * part / max(1, whole), 1)


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def summary(rows: list[dict], cold: list[dict]) -> dict:
    known = [r for r in rows if r["right"] is not None]
    kinds = sorted({r["kind"] for r in rows})
    return {
        "sentences": len(rows),
        "copy_pct": pct(sum(r["copy"] for r in rows), len(rows)),
        "copy_pct_by_kind": {k: pct(sum(r["copy"] for r in rows if r["kind"] == k),
                                    sum(r["kind"] == k for r in rows)) for k in kinds},
        "longest_run_median": median([r["run"] for r in rows]),
        "empty_pct": pct(sum(r["empty"] for r in rows), len(rows)),
        "non_english_pct": pct(sum(bool(r["non_english"]) for r in rows), len(rows)),
        "known_right": sum(r["right"] for r in known),
        "known_total": len(known),
        "first_token_median_ms": median([r["first_token_ms"] for r in rows]),
        "first_phrase_median_ms": median([r["first_phrase_ms"] for r in rows]),
        "ms_per_token_median": median([(r["total_ms"] - r["first_token_ms"]) / (r["tokens"] - 1)
                                       for r in rows if r["first_token_ms"] is not None and r["tokens"] > 1]),
        "first_phrase_p90_ms": round(statistics.quantiles([r["first_phrase_ms"] for r in rows
                                                          if r["first_phrase_ms"] is not None], n=10)[-1], 1),
        "cold_first_token_median_ms": median([r["first_token_ms"] for r in cold]),
        "prompt_tokens": cold[0]["prompt_tokens"] if cold else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--temperature", type=float, help="default: the preset's (llm.temperature)")
    parser.add_argument("--sweep", default="", help="also the new prompt with these block lengths, e.g. 0,3,5")
    parser.add_argument("--cold", type=int, default=10, help="sentences also answered with the context emptied")
    parser.add_argument("--known-repeats", type=int, default=3,
                        help="each known-answer question is asked this many times (sampled: one pass is noisy)")
    parser.add_argument("--limit", type=int, default=0, help="only every k-th transcript (0: all), for a quick look")
    args = parser.parse_args()
    preset = load_settings("cpu", environ={}).llm
    chats = {}
    for name, settings in rules(preset, [int(n) for n in args.sweep.split(",") if n]).items():
        chats[name] = ChatModel.load(settings)
        chats[name].warm_up()  # as the server does: the fixed prompt is evaluated ahead
    todo = [s for s in sentences() for _ in range(args.known_repeats if s.kind == "known" else 1)]
    if args.limit:
        todo = [s for i, s in enumerate(todo) if s.kind == "known" or i % args.limit == 0]
    rows: dict[str, list[dict]] = {name: [] for name in chats}
    for i, sentence in enumerate(todo):
        names = list(chats)
        for name in names[i % len(names):] + names[: i % len(names)]:  # each rule goes first in turn
            got = reply(chats[name], sentence.text, args.temperature)
            rows[name].append({"text": sentence.text, "kind": sentence.kind, **got, **judge(sentence, got["reply"])})
            print(f"{name:8} {rows[name][-1]['run']:2d} {got['first_phrase_ms']!s:>7} ms  {sentence.text[:40]!r} -> "
                  f"{got['reply'][:80]!r}", flush=True)
    cold: dict[str, list[dict]] = {name: [] for name in chats}
    for sentence in todo[: args.cold]:
        for name, chat in chats.items():
            got = reply(chat, sentence.text, args.temperature, cold=True)
            got["prompt_tokens"] = len(chat.prompt(chat.build_messages([], sentence.text)).tokens)
            cold[name].append(got)
    results = {name: summary(rows[name], cold[name]) for name in chats}
    for name, result in results.items():
        print(name, json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": results, "replies": rows, "cold": cold}, indent=1))
    new, old = results["new"], results["old"]
    print(f"replies: copy rate {new['copy_pct']:.0f}%, known answers {new['known_right']} of {new['known_total']} "
          f"right, first phrase median {new['first_phrase_median_ms']:.0f} ms (old rule copy rate "
          f"{old['copy_pct']:.0f}%)")


if __name__ == "__main__":
    main()
