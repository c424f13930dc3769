"""input_audio_buffer.*: the client's audio (24 kHz PCM16, or 8 kHz G.711: app/web/realtime/formats.py), heard
by the conversation's listener as it comes (server VAD), or kept until the client commits it as a user item
(manual turns)."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from app.audio import ASR_RATE
from app.core.conversation import Conversation
from app.core.listening import Listener
from app.web.realtime.errors import Refused
from app.web.realtime.formats import PCM, WireFormat
from app.web.realtime.history import Entry
from app.web.realtime.replies import Resampler, new_id
from app.web.ws import MAX_AUDIO_FRAME


class InputAudio:
    """The input audio of one session. `max_turn_s` caps what one commit may hold (turns.max_turn_s)."""

    def __init__(self, conversation: Conversation, max_turn_s: float) -> None:
        self.conversation = conversation
        self.max_turn_s = max_turn_s
        self._seconds = 0.0  # of audio the client has appended, for the VAD events' times
        self._format = PCM  # the session's audio.input.format
        self._listener: Listener | None = None  # server VAD: the stream being listened to
        self._input: Resampler | None = None  # the client's rate -> 16 kHz for the listener
        self._buffer: list[np.ndarray] = []  # manual commits: the audio not yet committed (16 kHz)

    @property
    def ms(self) -> int:
        """Milliseconds of audio appended so far: where the VAD events say speech started or stopped."""
        return int(self._seconds * 1000)

    @property
    def format(self) -> WireFormat:
        return self._format

    @format.setter
    def format(self, wanted: WireFormat) -> None:
        """A new format from the next append on (the old resampler's last few ms are dropped)."""
        if wanted != self._format:
            self._format, self._input = wanted, None

    def append(self, audio: str, *, server_vad: bool) -> None:
        pcm = samples(audio, self._format)
        if self._input is None:
            self._input = Resampler(self._format.rate, ASR_RATE, "flt")
        self._seconds += len(pcm) / self._format.rate
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

    def keep(self, audio: np.ndarray) -> None:
        """A commit that was refused: its audio is the buffer again, as it was."""
        self._buffer = [audio]

    def whole(self, audio: str) -> np.ndarray:
        """An input_audio item's audio, in the session's format, as the core hears it (16 kHz float32)."""
        return Resampler(self._format.rate, ASR_RATE, "flt").all(samples(audio, self._format))

    def clear(self) -> None:
        self._buffer, self._input = [], None

    def stop_listening(self) -> None:
        """Server VAD off (or the client commits): speech in progress ends its turn."""
        if self._listener is not None:
            self._listener.end()
            self._listener = None
            self.conversation.stop_listening()


def samples(data: str, wire: WireFormat = PCM) -> np.ndarray:
    """A base64 audio field in format `wire` as int16 samples; Refused if it is not that, or too long for one
    event."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused("invalid_audio", "audio") from exc
    if len(raw) > MAX_AUDIO_FRAME:
        raise Refused("invalid_audio", "audio")
    return wire.decode(raw)
