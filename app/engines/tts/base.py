"""The contract every text-to-speech engine implements (Piper on the cpu preset, CSM on gpu)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

import numpy as np


class TtsEngine(Protocol):
    """A loaded voice. Calls come from one worker thread, never from the event loop."""

    name: str
    sample_rate: int  # Hz of every chunk synthesize() yields

    def new_voice(self, speaker: int | None = None) -> object | None:
        """Per-conversation voice: which speaker (None: the engine's default) and its memory
        (CSM keeps its recent utterances here); None for an engine with neither."""
        ...

    def synthesize(
        self, text: str, *, voice: object | None = None, cancel: threading.Event | None = None
    ) -> Iterator[np.ndarray]:
        """Yield mono int16 PCM chunks, shape (samples,), as soon as each exists.

        Stops early, without raising, once `cancel` is set. Yields nothing for text with
        nothing to say. Raises on a model failure; the caller turns that into an error event.
        """
        ...

    def warm_up(self) -> None:
        """Run one short synthesis so that the first real phrase is not slowed by lazy init."""
        ...
