"""The real-speech turn-taking set (tests/data/turns): human utterances with their true end of speech
marked, and "paused" versions of some, made here by inserting a thinking pause at a word boundary.

Each manifest entry is one recording; an entry with a `pause` also gives a paused version: the same audio
with `pause.length_s` of the recording's own background noise inserted at `pause.at_s` (a gap between
two words in the middle of the sentence, found by benchmarks/make_turn_set.py). Nobody finishes a
sentence there, so an end of turn decided in that pause cuts the speaker off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from app.audio import ASR_RATE, read_audio_file

TURNS = Path(__file__).parent / "data" / "turns"
Kind = Literal["question", "statement", "command"]
Half = Literal["tune", "heldout"]


@dataclass(frozen=True)
class Utterance:
    id: str  # the recording's id, with "+pause" for a paused version
    audio: np.ndarray  # 16 kHz mono float32
    kind: Kind
    speaker: str
    half: Half
    text: str
    end_s: float  # where the speech truly ends in `audio`
    paused: bool = False
    pause_at_s: float | None = None  # where the inserted pause starts (paused versions only)

    @property
    def category(self) -> str:
        """How a benchmark groups it: by kind, with every paused version in a group of its own."""
        return "paused" if self.paused else self.kind


def manifest() -> list[dict]:
    return json.loads((TURNS / "manifest.json").read_text())["utterances"]


def load(half: Half | None = None, paused: bool = True) -> list[Utterance]:
    """Every utterance of `half` (both halves if None), each followed by its paused version if it has one."""
    out = []
    for entry in manifest():
        if half is not None and entry["half"] != half:
            continue
        audio = _audio(entry["file"])
        plain = Utterance(
            entry["id"], audio, entry["kind"], entry["speaker"], entry["half"], entry["text"], entry["end_s"]
        )
        out.append(plain)
        if paused and (pause := entry.get("pause")) is not None:
            out.append(with_pause(plain, pause["at_s"], pause["length_s"]))
    return out


def with_pause(utterance: Utterance, at_s: float, length_s: float) -> Utterance:
    """`utterance` with `length_s` of its own background noise inserted at `at_s`."""
    at, n = round(at_s * ASR_RATE), round(length_s * ASR_RATE)
    audio = utterance.audio
    gap = room_tone(audio, n)
    # A 5 ms fade on each side, so the cut itself makes no click that a detector could take for speech.
    fade = np.linspace(0.0, 1.0, 80, dtype=np.float32)
    head, tail = audio[:at].copy(), audio[at:].copy()
    head[-80:] *= fade[::-1]
    tail[:80] *= fade
    return Utterance(
        utterance.id + "+pause", np.concatenate([head, gap, tail]), utterance.kind, utterance.speaker,
        utterance.half, utterance.text, utterance.end_s + length_s, paused=True, pause_at_s=at_s,
    )


def room_tone(audio: np.ndarray, n: int) -> np.ndarray:
    """n samples that sound like the recording's quiet: its quietest 20 ms frames, strung together."""
    frame = ASR_RATE // 50
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame)
    quiet = frames[np.argsort((frames**2).mean(axis=1))[: max(1, len(frames) // 10)]]
    rng = np.random.default_rng(n)
    picked = quiet[rng.integers(0, len(quiet), n // frame + 1)].reshape(-1)
    return picked[:n].astype(np.float32)


@cache
def _audio(name: str) -> np.ndarray:
    audio = read_audio_file(str(TURNS / name), ASR_RATE)
    audio.flags.writeable = False
    return audio
