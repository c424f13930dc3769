"""When a pause ends the user's turn: how much silence it takes, from Smart Turn's verdict on the sound
(app/engines/smart_turn.py) and the LLM's on the words. The thresholds live in TurnSettings, each with
its reason; they were calibrated on the tuning half of tests/data/turns (benchmarks/bench_turns.py).
"""

from __future__ import annotations

import math

from app.core.turns import TurnSettings

WAIT_FOR_WORDS = math.inf  # the silence needed while the LLM's verdict is still on its way


class EndRule:
    """Both verdicts are probabilities that the turn is finished: Smart Turn's `sound`, and `words`, the
    LLM's for its end-of-message token after the transcript. Either may be None: not known (yet)."""

    def __init__(self, settings: TurnSettings) -> None:
        self.settings = settings
        self.reads_words = settings.decide_by == "fused"

    def silence_needed_ms(self, sound: float | None, words: float | None, *, words_due: bool = False) -> float:
        """The silence after which the turn ends. `words_due`: the words' verdict is coming, so a turn the
        sound alone cannot end at once waits for it (WAIT_FOR_WORDS) rather than for the sound-only rule."""
        s = self.settings
        if sound is None:  # Smart Turn failed: the longest silence decides
            return s.end_silence_ms
        if sound >= s.sure_sound:
            return s.pause_ms
        if not self.reads_words or (words is None and not words_due):
            return s.unsure_silence_ms if sound >= s.unsure_sound else s.end_silence_ms
        if words is None:
            return WAIT_FOR_WORDS
        score = logit(sound) + logit(words)
        if score >= s.finished_score:
            return s.pause_ms
        return s.unsure_silence_ms if score >= s.unsure_score else s.end_silence_ms


def logit(p: float) -> float:
    """log(p / (1 - p)), with p kept within [1e-4, 1 - 1e-4]: the LLM's probability of its end token
    after an unfinished clause underflows to 0, and a score of -inf would hide Smart Turn's."""
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))
