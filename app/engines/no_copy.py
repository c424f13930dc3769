"""Replies that answer instead of echoing: a llama.cpp logits processor that keeps the reply from continuing
a run of the user's words, and the word-run measure that it, the benchmark and the tests share."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def words(text: str) -> list[str]:
    """`text`'s words as compared here: lower case, punctuation dropped ("Paris," is "paris")."""
    return _WORD.findall(text.lower())


def longest_shared_run(reply: str, user: str) -> int:
    """The most consecutive words of `user` that `reply` repeats in order (0: none)."""
    a, b = words(reply), words(user)
    best, row = 0, [0] * (len(b) + 1)
    for wa in a:  # longest common substring over words, one row at a time
        prev_diag = 0
        for j, wb in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if wa == wb else 0
            best = max(best, row[j])
    return best


def run_ends(reply_words: list[str], user_words: list[str], length: int) -> list[int]:
    """Where in `user_words` a run of at least `length` of them ends that `reply_words` ends with."""
    if length <= 0:
        return list(range(-1, len(user_words)))  # before any word: each word could start a run
    tail = reply_words[-length:]
    if len(tail) < length:
        return []
    return [i for i in range(length - 1, len(user_words)) if user_words[i - length + 1 : i + 1] == tail]


class CopyBlock:
    """Called by llama.cpp before each token is sampled (a logits processor): when the reply's last
    `limit` - 1 words are a run of the user's message, every token that would start the user's next word
    gets no chance, so the reply never holds `limit` consecutive words of it. Single words, names and
    shorter runs ("the capital of") stay possible: only the word that would make the run long enough is
    blocked, and only at that point. Inside a function call (after `call_open`) nothing is blocked:
    arguments may quote the user.

    `tokenize(text)` gives text's tokens as the reply would hold them, `detokenize(tokens)` the text;
    `reply_start` is where the reply begins in the token ids llama.cpp passes (the prompt's length).
    """

    def __init__(self, user_text: str, limit: int, reply_start: int, *, tokenize: Callable[[str], list[int]],
                 detokenize: Callable[[list[int]], str], call_open: str = "") -> None:
        self.limit, self.reply_start = limit, reply_start
        self._user = words(user_text)
        self._detokenize, self._call_open = detokenize, call_open
        # The tokens each word may start with: after a space or not, in the user's case, lower, Title or UPPER.
        spelled = dict(zip(self._user, re.findall(_WORD.pattern, user_text, re.IGNORECASE), strict=False))
        self._starts = {
            word: sorted({tokens[0] for form in _forms(word, spelled.get(word, word))
                          for text in (" " + form, form) if (tokens := tokenize(text))})
            for word in set(self._user)
        }

    def __eq__(self, other: object) -> bool:  # the same rule for the same prompt (Prompts compare equal)
        return isinstance(other, CopyBlock) and (self._user, self.limit, self.reply_start, self._call_open) == (
            other._user, other.limit, other.reply_start, other._call_open)

    __hash__ = None  # type: ignore[assignment]

    def blocked(self, reply: str) -> list[int]:
        """The tokens that may not come next after the reply text `reply`."""
        if self._call_open and self._call_open in reply:
            return []
        ends = run_ends(words(reply), self._user, self.limit - 1)
        return sorted({t for i in ends if i + 1 < len(self._user) for t in self._starts[self._user[i + 1]]})

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        reply = self._detokenize([int(t) for t in input_ids[self.reply_start :]])
        blocked = self.blocked(reply)
        if blocked:
            scores[blocked] = -np.inf
        return scores


def _forms(word: str, spelled: str) -> set[str]:
    return {spelled, word, word.capitalize(), word.upper()}
