"""One reply as it happens: the text the LLM wrote, the phrases sent as audio, and what was heard.

Audio leaves the server faster than real time, and the page plays it from the moment the first
chunk arrives; so, when the user cuts in, the part of the reply they actually heard follows from
the playback clock (or from the page, which counts the samples it played).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

JITTER_BUFFER_S = 0.08  # the page buffers this much before it starts playing


@dataclass
class Reply:
    sample_rate: int
    text: str = ""  # everything the LLM wrote
    phrases: list[tuple[str, int]] = field(default_factory=list)  # (phrase, sample where it ends)
    samples: int = 0  # audio samples sent so far
    marks: dict[str, float] = field(default_factory=dict)  # stage -> perf_counter()
    history_index: int | None = None  # where its text sits in the session history
    calls: str = ""  # the arguments of the function calls it made, all together (for the token count)
    input_tokens: int = 0  # the prompt, in the LLM's tokens
    output_tokens: int = 0  # what it wrote

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())

    def add_audio(self, samples: int) -> None:
        if not self.samples:
            self.mark("first_audio")
        self.samples += samples

    def end_phrase(self, phrase: str) -> None:
        self.phrases.append((phrase, self.samples))

    @property
    def spoken(self) -> str:
        """The text of every phrase whose audio was all sent."""
        return " ".join(phrase for phrase, _ in self.phrases)

    def played_estimate(self, now: float | None = None) -> int:
        """Samples the page has played by `now`, by the playback clock."""
        start = self.marks.get("first_audio")
        if start is None:
            return 0
        now = time.perf_counter() if now is None else now
        elapsed = max(0.0, now - start - JITTER_BUFFER_S)
        return min(self.samples, int(elapsed * self.sample_rate))

    def playback_end(self) -> float:
        """perf_counter() when the page will have played all the audio sent so far (0: none sent)."""
        start = self.marks.get("first_audio")
        return 0.0 if start is None else start + JITTER_BUFFER_S + self.samples / self.sample_rate

    def continued_by(self, t_onset: float, within_s: float) -> bool:
        """Speech that began at `t_onset` continues the user's turn: the reply had not begun to play
        (no audio yet) or began less than `within_s` before, too soon for the user to be answering it."""
        start = self.marks.get("first_audio")
        return start is None or t_onset <= start + JITTER_BUFFER_S + within_s

    def still_playing(self, now: float | None = None) -> bool:
        return (time.perf_counter() if now is None else now) < self.playback_end()

    def heard(self, played: int) -> str:
        """The words the user heard when playback stopped after `played` samples."""
        words: list[str] = []
        start = 0
        for phrase, end in self.phrases:
            if played >= end:
                words.append(phrase)
            elif played > start:
                # Mid-phrase: keep the share of its words that was played, rounded down.
                parts = phrase.split()
                keep = int(len(parts) * (played - start) / max(1, end - start))
                words.extend(parts[:keep])
                break
            else:
                break
            start = end
        return " ".join(words)
