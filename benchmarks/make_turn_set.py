"""How tests/data/turns was made from public recordings; run once, its output is in the repository.

    python benchmarks/make_turn_set.py voices --sources SRC --voices voices.json   # pip install resemblyzer scipy
    uv run python benchmarks/make_turn_set.py build --sources SRC --voices voices.json --out tests/data/turns

SRC holds the checked-out sources (see tests/data/turns/README.md): Picovoice/speech-to-intent-benchmark's
data/speech/clean, resemble-ai/Resemblyzer's audio_data/librispeech_train-clean-100, auspicious3000/autovc's wavs.
Steps, each deterministic (a rerun gives the same set; see whisper() for the one exception there was):
1. Every recording: its true end of speech (energy, below), and Whisper tiny.en's words with their times.
2. Kind by the words: a question, a command (it opens with a verb that asks for something), else a statement.
3. Speakers: LibriSpeech and VCTK name them. The Picovoice recordings do not; they are grouped by voice with
   Resemblyzer's speaker embeddings (the `voices` step, in an environment of its own with resemblyzer and
   scipy: neither is the project's), and the halves are split by coarse groups so that no voice can land in
   both.
4. A balanced pick per half, and for each utterance that has one a thinking pause: at the quietest boundary
   after a function word in the middle 60% of the sentence, 0.5-1.2 s long (tests/turn_set.py inserts it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import av
import numpy as np

from app.audio import ASR_RATE, float_to_int16, read_audio_file

FRAME = ASR_RATE // 100  # 10 ms
KEEP_BEFORE_S, KEEP_AFTER_S = 0.4, 0.7  # the recording's own quiet kept around the speech
QUESTION = re.compile(r"^(can|could|may|would|will|do|does|did|is|are|should|shall|have|has)\b", re.I)
COMMAND = re.compile(r"^(please\b|give|get|make|bring|grab|pour|brew|fix|prepare|order|put|add|let|show|tell|"
                     r"send|set|turn|play|find|start|stop)\b", re.I)
PER_HALF = {  # (source, kind): how many of each per half
    ("picovoice", "question"): 10, ("picovoice", "command"): 10, ("picovoice", "statement"): 7,
    ("librispeech", "statement"): 10, ("librispeech", "question"): 1, ("vctk", "statement"): 4,
}


def speech_span(audio: np.ndarray) -> tuple[float, float] | None:
    """(start, end) of the speech in seconds: the first and last run of 30 ms or more whose 10 ms energy is
    both 12 dB over the recording's noise floor (its 10th percentile) and within 38 dB of its loud frames
    (99th percentile). A breath or click shorter than 30 ms after the last word does not count."""
    n = len(audio) // FRAME
    db = 10 * np.log10(np.mean(audio[: n * FRAME].reshape(n, FRAME) ** 2, axis=1) + 1e-12)
    threshold = max(np.percentile(db, 10) + 12, np.percentile(db, 99) - 38)
    loud = np.concatenate([[False], db > threshold, [False]])
    edges = np.flatnonzero(np.diff(loud.astype(np.int8)))
    runs = [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a >= 3]
    return (runs[0][0] / 100, runs[-1][1] / 100) if runs else None


def kind_of(text: str) -> str:
    """What the last sentence is: the end of the turn is what a turn-taking rule hears."""
    text = re.split(r"(?<=[.?!])\s+", text.strip())[-1]
    if text.endswith("?") or QUESTION.match(text):
        return "question"
    return "command" if COMMAND.match(text) else "statement"


# Words after which a sentence cannot end: a hesitation falls here ("I'd like a ... large latte"), before the
# content word that is being looked for, and not after a phrase that could end the sentence (which would
# be a second thought, indistinguishable from a finished turn by any rule, or by a listener).
FUNCTION_WORDS = set("a an the of with and or to for some my your his her its our their in on at from by about into "
                     "over under which that than as but is was were are be been have had would could will shall can "
                     "i'd i'll like".split())


def pause_point(audio: np.ndarray, words: list[tuple[str, float, float]], heard: Callable[[np.ndarray], str]
                ) -> float | None:
    """Where to pause: the quietest point between a function word in the middle of the sentence and the word
    after it, checked by ear: Whisper's word times can be a word off, so the audio before the point must be
    heard ending with that function word, or the audio after it starting with the next word (`heard`
    transcribes). None where no boundary passes."""
    points = []
    for i in range(int(len(words) * 0.2), int(len(words) * 0.8)):
        word, _, end = words[i]
        if word.strip().lower() not in FUNCTION_WORDS:
            continue
        a, b = int((end - 0.03) * ASR_RATE), int((words[i + 1][1] + 0.03) * ASR_RATE)
        starts = range(a, b - FRAME, FRAME // 2)
        energies = [(float(np.mean(audio[k : k + FRAME] ** 2)), k + FRAME // 2) for k in starts]
        if energies:
            points.append((*min(energies), word, words[i + 1][0]))
    for _, at, word, after in sorted(points):
        # Heard either way: the head ends with the function word, or the rest starts with the word after it.
        if _words(heard(audio[:at]))[-1:] == _words(word) or _words(heard(audio[at:]))[:1] == _words(after):
            return at / ASR_RATE
    return None


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9']", " ", text.lower()).split()


def pause_length(uid: str) -> float:
    """0.5-1.2 s, fixed by the utterance's id."""
    h = int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return round(0.5 + 0.7 * h, 2)


@cache
def whisper():
    """The cpu preset's Whisper (tiny.en), loaded once for every step that listens. On one thread: on
    several, CTranslate2's int8 kernels split the work differently from run to run, and a borderline
    word at a pause point was heard one way in one run and another way in the next."""
    from faster_whisper import WhisperModel

    from app.engines.asr import AsrSettings
    from app.engines.models import resolve

    return WhisperModel(str(resolve(AsrSettings().model, "asr")), device="cpu", compute_type="int8", cpu_threads=1)


@cache
def vad_model():
    from app.engines.vad import load_vad_model

    return load_vad_model()


def transcribe(paths: list[Path]) -> dict[str, dict]:
    model = whisper()
    found = {}
    for path in paths:
        audio = read_audio_file(str(path), ASR_RATE)
        segments, _ = model.transcribe(audio, language="en", word_timestamps=True, beam_size=1,
                                       condition_on_previous_text=False)
        words = [(w.word, round(w.start, 2), round(w.end, 2)) for s in segments for w in s.words]
        found[str(path)] = {"text": "".join(w[0] for w in words).strip(), "words": words}
    return found


def silero_end(audio: np.ndarray) -> float:
    """Where Silero VAD last hears speech (probability 0.5 or more), in seconds."""
    from app.engines.vad import WINDOW, StreamingVad

    vad = StreamingVad(vad_model())
    speech = [i for i in range(0, len(audio) - WINDOW + 1, WINDOW) if vad(audio[i : i + WINDOW]) >= 0.5]
    return (speech[-1] + WINDOW) / ASR_RATE if speech else 0.0


def voice_groups(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """Recordings grouped by voice: average-linkage clusters of Resemblyzer embeddings by cosine distance.
    Fine groups (0.25) come to ~50 voices, as many speakers as the source says it has; the halves follow
    coarse ones (0.35), so that a voice split between two fine groups stays on one side."""
    from resemblyzer import VoiceEncoder, preprocess_wav
    from scipy.cluster.hierarchy import fcluster, linkage

    encoder = VoiceEncoder("cpu")
    tree = linkage(np.stack([encoder.embed_utterance(preprocess_wav(p)) for p in paths]), "average", metric="cosine")
    fine, coarse = (fcluster(tree, threshold, "distance") for threshold in (0.25, 0.35))
    return {str(p): (int(f), int(c)) for p, f, c in zip(paths, fine, coarse, strict=True)}


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def candidates(analysed: dict[str, dict], voices: dict[str, list[int]]) -> list[dict]:
    """Every usable recording with its source, speaker, kind and the split unit its half follows."""
    found = []
    for path, info in analysed.items():
        name, text = Path(path).stem, info["text"]
        if "speech/clean" in path:
            source, speaker, unit = "picovoice", f"picovoice-v{voices[path][0]:02d}", f"picovoice-g{voices[path][1]}"
        elif "librispeech" in path:
            source = "librispeech"
            speaker = unit = f"librispeech-{name.split('-')[0]}"
            # LibriSpeech cuts long sentences at pauses: only a whole sentence counts as finished.
            if not (text[:1].isupper() and text[-1:] in ".?!"):
                continue
        else:
            source, speaker = "vctk", f"vctk-{Path(path).parent.name}"
            unit = speaker
        # One sentence each: a reader going on after a full stop is reading aloud, not taking a turn.
        if re.search(r"[.?!]\s", text):
            continue
        if info["span"] is None:  # no speech at all
            continue
        start, end = info["span"][:2]
        # Where a noise after the last word (a click, a breath) or quiet speech misleads the energy, it
        # disagrees with Silero VAD about the end: such a recording is left out rather than guessed at.
        if abs(info["silero_end"] - end) > 0.25:
            continue
        if not 1.0 <= end - start <= 14.0 or not text:
            continue
        found.append({"path": path, "source": source, "speaker": speaker, "unit": unit, "text": text,
                      "kind": kind_of(text), "span": (start, end), "words": info["words"]})
    return found


def split(units: list[str]) -> dict[str, str]:
    """Each split unit (a speaker, or a group of similar voices) to one half, balancing their sizes."""
    sizes: dict[str, int] = {}
    for unit in units:
        sizes[unit] = sizes.get(unit, 0) + 1
    halves, counts = {}, {"tune": 0, "heldout": 0}
    for unit in sorted(sizes, key=lambda u: (-sizes[u], _rank(u))):
        half = min(counts, key=lambda h: (counts[h], h == "tune"))
        halves[unit] = half
        counts[half] += sizes[unit]
    return halves


def pick(found: list[dict]) -> list[dict]:
    """PER_HALF of each source and kind per half, at most 2 per speaker, in a fixed pseudo-random order."""
    halves: dict[str, str] = {}
    for source in ("picovoice", "librispeech", "vctk"):
        halves |= split([c["unit"] for c in found if c["source"] == source])
    chosen, per_speaker = [], {}
    for c in sorted(found, key=lambda c: _rank(c["path"])):
        c["half"] = halves[c["unit"]]
        taken = sum(1 for x in chosen if (x["source"], x["kind"], x["half"]) == (c["source"], c["kind"], c["half"]))
        if taken < PER_HALF.get((c["source"], c["kind"]), 0) and per_speaker.get(c["speaker"], 0) < 2:
            chosen.append(c)
            per_speaker[c["speaker"]] = per_speaker.get(c["speaker"], 0) + 1
    return chosen


def write(chosen: list[dict], out: Path) -> None:
    def heard(audio: np.ndarray) -> str:
        return " ".join(s.text for s in whisper().transcribe(audio, language="en", beam_size=1)[0])

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for c in sorted(chosen, key=lambda c: (c["half"], c["source"], c["kind"], c["path"])):
        audio = read_audio_file(c["path"], ASR_RATE)
        begin = max(0.0, c["span"][0] - KEEP_BEFORE_S)
        clip = audio[int(begin * ASR_RATE) : int(min(len(audio) / ASR_RATE, c["span"][1] + KEEP_AFTER_S) * ASR_RATE)]
        uid = f"{c['source']}-{Path(c['path']).stem[:13]}"
        write_flac(out / f"{uid}.flac", clip)
        words = [(w, s - begin, e - begin) for w, s, e in c["words"]]
        entry = {"id": uid, "file": f"{uid}.flac", "speaker": c["speaker"], "kind": c["kind"], "text": c["text"],
                 "end_s": round(c["span"][1] - begin, 2), "half": c["half"], "source": c["source"]}
        if (at := pause_point(clip, words, heard)) is not None:
            entry["pause"] = {"at_s": round(at, 3), "length_s": pause_length(uid)}
        entries.append(entry)
    (out / "manifest.json").write_text(json.dumps({"utterances": entries}, indent=1) + "\n")


def write_flac(path: Path, audio: np.ndarray) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flac", rate=ASR_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(float_to_int16(audio)[None], format="s16", layout="mono")
        frame.sample_rate = ASR_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["voices", "build"])
    parser.add_argument("--sources", type=Path, required=True)
    parser.add_argument("--voices", type=Path, required=True, help="the voices step's output (JSON)")
    parser.add_argument("--out", type=Path, default=Path("tests/data/turns"))
    parser.add_argument("--analysed", type=Path, help="cache of step 1 (JSON), made if missing")
    args = parser.parse_args()
    if args.step == "voices":
        args.voices.write_text(json.dumps(voice_groups(sorted(args.sources.glob("data/speech/clean/*.wav")))))
        return
    paths = sorted([*args.sources.glob("data/speech/clean/*.wav"),
                    *args.sources.glob("audio_data/librispeech_train-clean-100/*.flac"),
                    *args.sources.glob("wavs/p22*/*.wav")])
    analysed = json.loads(args.analysed.read_text()) if args.analysed and args.analysed.exists() else {}
    if missing := [p for p in paths if str(p) not in analysed]:
        analysed |= transcribe(missing)
    for p in paths:
        if "silero_end" not in (info := analysed[str(p)]):
            audio = read_audio_file(str(p), ASR_RATE)
            info["span"], info["silero_end"] = speech_span(audio), silero_end(audio)
    if args.analysed:
        args.analysed.write_text(json.dumps(analysed))
    write(pick(candidates(analysed, json.loads(args.voices.read_text()))), args.out)


if __name__ == "__main__":
    main()
