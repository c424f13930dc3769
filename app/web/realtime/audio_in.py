"""input_audio_buffer.*: the client's 24 kHz PCM16, heard by the conversation's listener as it comes
(server VAD), or kept until the client commits it as a user item (manual turns)."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from app.audio import ASR_RATE
from app.core.conversation import Conversation
from app.core.listening import Listener
from app.web.realtime import protocol as rt
from app.web.realtime.errors import Refused
from app.web.realtime.history import Entry
from app.web.realtime.replies import Resampler, new_id
from app.web.ws import MAX_AUDIO_FRAME


class InputAudio:
    """The input audio of one session. `max_turn_s` caps what one commit may hold (turns.max_turn_s)."""

    def __init__(self, conversation: Conversation, max_turn_s: float) -> None:
        self.conversation = conversation
        self.max_turn_s = max_turn_s
        self.samples = 0  # 24 kHz samples the client has appended, for the VAD events' times
        self._listener: Listener | None = None  # server VAD: the stream being listened to
        self._input: Resampler | None = None  # 24 kHz in -> 16 kHz for the listener
        self._buffer: list[np.ndarray] = []  # manual commits: the audio not yet committed (16 kHz)

    @property
    def ms(self) -> int:
        """Milliseconds of audio appended so far: where the VAD events say speech started or stopped."""
        return self.samples * 1000 // rt.RATE

    def append(self, audio: str, *, server_vad: bool) -> None:
        pcm = pcm16(audio)
        if self._input is None:
            self._input = Resampler(rt.RATE, ASR_RATE, "flt")
        self.samples += len(pcm)
        heard = self._input.feed(pcm)
        if server_vad:
            if self._listener is None:
                self._listener = self.conversation.listen()
            self._listener.feed(heard)
        elif sum(map(len, self._buffer)) + len(heard) > self.max_turn_s * ASR_RATE:
            raise Refused("buffer_full")  # one committed turn is one core turn: never longer than that
        else:
            self._buffer.append(heard)

    def commit(self) -> Entry:
        """Manual turns: the buffer becomes a user item, which response.create answers."""
        if self._input is not None:
            self._buffer.append(self._input.flush())
            self._input = None
        audio = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.float32)
        self._buffer = []
        if not len(audio):
            raise Refused("input_audio_buffer_commit_empty")
        return Entry(new_id("item"), spoken=True, audio=audio, seconds=len(audio) / ASR_RATE, status="in_progress")

    def clear(self) -> None:
        self._buffer, self._input = [], None

    def stop_listening(self) -> None:
        """Server VAD off (or the client commits): speech in progress ends its turn."""
        if self._listener is not None:
            self._listener.end()
            self._listener = None
            self.conversation.stop_listening()


def pcm16(data: str) -> np.ndarray:
    """A base64 audio field as PCM16 samples; Refused if it is not that, or too long for one event."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused("invalid_audio", "audio") from exc
    if len(raw) % 2 or len(raw) > MAX_AUDIO_FRAME:
        raise Refused("invalid_audio", "audio")
    return np.frombuffer(raw, "<i2")
