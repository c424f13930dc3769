"""Listening to one recording: its 16 kHz PCM goes through Silero VAD and the end-of-turn rules on a
thread of its own, and what they find (speech started, an interim snapshot, a finished turn, the end
of the recording) is handed to the conversation on its event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .audio import ASR_RATE
from .events import Options
from .turns import Event, StreamingVad, TurnDetector, TurnSettings

if TYPE_CHECKING:
    import onnxruntime

    from .conversation import Conversation


class _End:
    def __init__(self, error: str | None) -> None:
        self.error = error


class Listener:
    """One microphone stream. feed() and end() may be called from any thread."""

    def __init__(
        self,
        conversation: Conversation,
        vad_model: onnxruntime.InferenceSession,
        settings: TurnSettings,
        options: Options,
    ) -> None:
        self._conversation = conversation
        self._loop = asyncio.get_running_loop()
        # A VAD state of its own: the previous recording's thread may still be draining.
        self.detector = TurnDetector(settings, StreamingVad(vad_model))
        self.apply(options)
        self.turns_found = 0
        self._inbox: queue.SimpleQueue[np.ndarray | _End] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="listener", daemon=True).start()

    def apply(self, options: Options) -> None:
        """Hands-free or push-to-talk, and the pause that ends a turn; also for the turn being
        spoken (the detector reads them on its thread at its next 32 ms window)."""
        push_to_talk = options.mode == "push_to_talk"
        self.detector.set_end(end_silence_ms=options.end_silence_ms, push_to_talk=push_to_talk)

    def feed(self, pcm: np.ndarray) -> None:
        """More of the recording: mono float32 at 16 kHz."""
        self._inbox.put(pcm)

    def end(self, error: str | None = None) -> None:
        """The recording is over (with why, if it could not be read); speech in progress ends its turn."""
        self._inbox.put(_End(error))

    def _run(self) -> None:
        while not isinstance(item := self._inbox.get(), _End):
            # While the assistant speaks, only confident speech counts (its own voice may leak in).
            self.detector.strict = time.perf_counter() < self._conversation.playback_end
            for event in self.detector.feed(item):
                self._report(event)
        if (event := self.detector.flush()) is not None:
            self._report(event)
        self._post(self._conversation.recording_ended, self, item.error)

    def _report(self, event: Event) -> None:
        if event is Event.SPEECH_STARTED:
            self._post(self._conversation.speech_started)
        elif event is Event.INTERIM:
            self._post(self._conversation.interim, self.detector.snapshot())
        else:
            self.turns_found += 1
            audio, speech_end = self.detector.take_turn()
            now = time.perf_counter()
            # The stream runs in real time, so the speech ended as long ago as the audio after it.
            t_speech_end = now - (self.detector.position - speech_end) / ASR_RATE
            self._post(self._conversation.speech_turn, audio, t_speech_end, now)

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone: the conversation has ended
            pass
