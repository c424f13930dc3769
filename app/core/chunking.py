"""LLM text -> speakable phrases: cut the token stream where a voice would pause.

The first phrase is cut early (at a clause break, or before a word that opens a clause) so that
speech starts sooner; later ones are whole sentences, and an over-long sentence is split at a comma,
never inside a word or number.
"""

from __future__ import annotations

import re

import msgspec

ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "a.m", "p.m",
    "no", "fig", "approx", "dept", "inc", "ltd", "co", "u.s", "mt",
}
# A break is followed by a space, or ends the text so far (see _complete).
_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*(?=\s|$)")
_CLAUSE_END = re.compile(r"[,;:—–](?=\s|$)")
# Words that open a clause, where a speaker may pause: a long first sentence is cut before one, so that
# the voice starts on its first words (each token of them is ~17 ms of SmolLM2 on a CPU, and Piper reads
# a whole phrase, ~50-90 ms, before its first sample). "and", "or", "so" and "that" are left out: they
# join or qualify words as often as they open clauses.
_CLAUSE_OPENER = re.compile(
    r"\s(?=(?:because|but|which|who|while|when|where|whereas|although|though|since|unless|until|if)\s)",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"[*#_`~<>\[\]{}|^]+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:])")


class ChunkSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    first_min_chars: int = 12  # a first clause shorter than this waits for more text
    max_chars: int = 160  # a sentence longer than this is split at a clause break or space


def speakable(text: str) -> str:
    """Drop markdown and collapse whitespace: TTS engines read symbols out loud or choke on them."""
    text = " ".join(_MARKUP.sub(" ", text).split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


class PhraseChunker:
    """Feed LLM deltas with push(); each call returns the phrases completed by that text."""

    def __init__(self, settings: ChunkSettings | None = None) -> None:
        self.settings = settings or ChunkSettings()
        self._buffer = ""
        self._emitted = 0

    def push(self, delta: str) -> list[str]:
        self._buffer += delta
        phrases = []
        while (cut := self._next_cut()) is not None:
            phrase, self._buffer = self._buffer[:cut], self._buffer[cut:]
            phrases += self._emit(phrase)
        return phrases

    def flush(self) -> list[str]:
        """End of the reply: whatever is left is the last phrase."""
        phrase, self._buffer = self._buffer, ""
        return self._emit(phrase)

    def _emit(self, phrase: str) -> list[str]:
        clean = speakable(phrase)
        if not any(ch.isalnum() for ch in clean):
            return []
        self._emitted += 1
        return [clean]

    def _next_cut(self) -> int | None:
        text = self._buffer
        for match in _SENTENCE_END.finditer(text):
            if _complete(text, match) and not _is_abbreviation(text, match.start()):
                return match.end()
        if self._emitted == 0:
            for match in _CLAUSE_END.finditer(text):
                if _complete(text, match) and len(text[: match.end()].strip()) >= self.settings.first_min_chars:
                    return match.end()
            for match in _CLAUSE_OPENER.finditer(text):
                if len(text[: match.start()].strip()) >= self.settings.first_min_chars:
                    return match.start()
        if len(text) > self.settings.max_chars:
            return _split_long(text, self.settings.max_chars)
        return None


def _complete(text: str, match: re.Match[str]) -> bool:
    """A break at the very end of the text so far is cut at once when it follows a word: the voice
    then starts without waiting for the next token (a whole token's time, and for a one-sentence
    reply the end-of-reply token's). After a digit it waits for the space: "4." may become "4.5"."""
    return match.end() < len(text) or text[match.start() - 1 : match.start()].isalpha()


def _is_abbreviation(text: str, dot: int) -> bool:
    """True when the period at `dot` belongs to 'Dr.', 'e.g.' or a single initial like 'J.'."""
    if text[dot] != ".":
        return False
    word = text[:dot].split()[-1].lower() if text[:dot].split() else ""
    word = word.lstrip("(\"'")
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _split_long(text: str, limit: int) -> int:
    """Cut point at the last clause break before `limit`, else the last space; never mid-word."""
    head = text[:limit]
    clauses = list(_CLAUSE_END.finditer(head))
    if clauses and clauses[-1].end() > limit // 3:
        return clauses[-1].end()
    space = head.rfind(" ")
    return space if space > 0 else limit
