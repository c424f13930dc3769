"""A user turn on its way to be answered: what was said or typed, and when its end was heard and decided."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.core.events import ReplyRequest


@dataclass
class PendingTurn:
    id: int
    t_speech_end: float  # perf_counter() when the user stopped speaking (or sent text)
    t_decided: float  # when the end of the turn was decided
    audio: np.ndarray | None = None
    text: str | None = None
    answer: bool = True  # False: transcribe it, but end it "not_answered" (Options.answer_speech)
    # A guess reports here how likely its words end the turn (None: no words, or no way to judge).
    on_words: Callable[[float | None], None] | None = None
    request: ReplyRequest | None = None  # how its reply is to be made, where an adapter says (else as any)

    @property
    def has_words(self) -> bool:
        """Whether the user said or typed something; a turn without is a reply to the context as it is
        (a greeting, the answer after a function's result)."""
        return self.audio is not None or self.text is not None

    def words_judged(self, probability: float | None) -> None:
        """Report once: a guess that fails or stops early reports None from its `finally`."""
        if self.on_words is not None:
            report, self.on_words = self.on_words, None
            report(probability)
