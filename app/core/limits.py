"""What one client may ask of the server, so that no session can starve the others or make the
server buffer without bound. Every limit is a setting (`VA_LIMITS__<FIELD>`); hitting one is an
`error` event with its code (app/core/events.py), never a lost session for anyone else."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec

from app.core import events as ev


class LimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Open /ws sessions; the next one gets `busy` and is closed with 1013 (try again later).
    max_sessions: int = 8
    # Turns waiting behind the one being answered; one more drops the oldest waiting (`turn_dropped`).
    max_queued_turns: int = 2
    # Characters of a typed message; a longer one is refused (`too_long`).
    max_text_chars: int = 2000
    # Context tokens a system prompt must leave free beside the longest reply, for the user's
    # message and some history; a `hello` whose prompt does not fit is refused (`too_long`).
    prompt_room_tokens: int = 256
    # A WebSocket frame larger than this is refused by uvicorn before it is read whole (close 1009):
    # a little above the largest audio frame (512 KB, app/web/ws.py) and any JSON message.
    max_frame_bytes: int = 576 * 1024
    # Bytes of events waiting to go out to one client; past it the reply's audio is dropped and its
    # turn ends `interrupted` (`slow_client`): about 45 s of 22 kHz voice.
    max_outgoing_bytes: int = 2 * 1024 * 1024
    # /v1/realtime: items added while no response.create has come (user text or audio, committed buffers,
    # any other item); one more is refused (`too_many_items`). Their audio is heard as one turn of the core,
    # so together it is at most turns.max_turn_s (`too_long`), like one committed buffer.
    max_pending_items: int = 64
    # /v1/realtime: characters of text (messages, function calls' arguments and outputs) of those waiting items
    # together; an item that would go past it is refused (`too_long`): eight typed messages' worth, more
    # than the cpu preset's whole context (2048 tokens) holds, so no response is kept from reading what fits.
    max_pending_chars: int = 16000
    # /v1/realtime: items a conversation keeps; past it the oldest goes (the model reads only the newest
    # exchanges anyway: llm.history_turns), so no client can grow the history without bound.
    max_items: int = 512
    # Seconds of audio a session may send per second, sustained; past it (and the burst below) its audio is
    # dropped, not buffered (`audio_too_fast`): the listener hears it at the pace it comes.
    max_audio_speed: float = 2.0
    # Seconds of audio it may send ahead of that pace at once: a whole recording appended in one go (the
    # longest turn, turns.max_turn_s, by default).
    max_audio_burst_s: float = 30.0
    # Bytes of a /ws recording not yet read by its decoder: a frame past it is dropped (`audio_too_fast`).
    max_pending_audio_bytes: int = 1024 * 1024
    # A session with nothing from its user for this long (no message but audio, no speech heard, no reply
    # under way) is closed (`idle`, close 1000 "idle"); 0: never.
    idle_timeout_s: float = 1800.0
    # Open sessions of one client address, /ws and /v1/realtime together; the next gets `too_many_sessions`
    # and close 1013. Behind Docker's port publishing or a reverse proxy every client has the same address.
    max_sessions_per_client: int = 4
    # POST /v1/audio/transcriptions: bytes of one request (OpenAI's own file limit is 25 MB), and seconds of audio
    # its file may hold: a longer one is refused, since its transcription holds the speech-to-text model that
    # every conversation shares (tiny.en on 2 cores: ~10 s of work for 5 minutes of speech).
    max_upload_bytes: int = 25 * 1024 * 1024
    max_upload_s: float = 600.0

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_queued_turns, self.max_text_chars, self.max_sessions_per_client) < 1:
            raise ValueError("limits: max_sessions, max_queued_turns, max_text_chars and max_sessions_per_client "
                             "must be >= 1")
        if self.prompt_room_tokens < 0 or self.max_frame_bytes < 1024 or self.max_outgoing_bytes < 64 * 1024:
            raise ValueError("limits: prompt_room_tokens >= 0, max_frame_bytes >= 1024, "
                             "max_outgoing_bytes >= 65536")
        if not 1 <= self.max_pending_items <= self.max_items or self.max_pending_chars < self.max_text_chars:
            raise ValueError("limits: 1 <= max_pending_items <= max_items, max_pending_chars >= max_text_chars")
        if self.max_audio_speed < 1.0 or self.max_audio_burst_s < 1.0 or self.max_pending_audio_bytes < 64 * 1024:
            raise ValueError("limits: max_audio_speed >= 1 (real time), max_audio_burst_s >= 1, "
                             "max_pending_audio_bytes >= 65536")
        if self.max_upload_bytes < 64 * 1024 or self.max_upload_s < 1.0:
            raise ValueError("limits: max_upload_bytes >= 65536, max_upload_s >= 1")
        if self.idle_timeout_s < 0:
            raise ValueError("limits: idle_timeout_s >= 0 (0: never)")


TELL_EVERY_S = 1.0  # a client sending too fast hears so at most this often, not once per dropped piece


class AudioAllowance:
    """How far one session's audio may run ahead of the wall clock: a bucket of seconds of audio that
    refills at `speed` seconds a second up to `burst_s`. What does not fit is dropped, so whatever waits
    to be heard is bounded by it. Called from the decoder's thread and the event loop alike."""

    def __init__(self, speed: float, burst_s: float, *, counted: Callable[[str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.speed, self.burst_s = speed, burst_s
        self._counted = counted  # (fate "heard" or "dropped", seconds): the server's metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._left = burst_s
        self._at = clock()
        self._told = -math.inf

    @classmethod
    def of(cls, limits: LimitSettings, counted: Callable[[str, float], None] | None = None) -> AudioAllowance:
        """One session's, as `limits` say (max_audio_speed, max_audio_burst_s)."""
        return cls(limits.max_audio_speed, limits.max_audio_burst_s, counted=counted)

    def take(self, seconds: float, waiting_s: float = 0.0) -> bool:
        """Whether `seconds` more audio may be heard now (taken from the allowance), or must be dropped; also
        dropped while `waiting_s` not yet heard would then pass the burst (the listener is behind)."""
        with self._lock:
            now = self._clock()
            self._left = min(self.burst_s, self._left + (now - self._at) * self.speed)
            self._at = now
            fits = seconds <= self._left and waiting_s + seconds <= self.burst_s
            if fits:
                self._left -= seconds
        if self._counted is not None:
            self._counted("heard" if fits else "dropped", seconds)
        return fits

    def tell_now(self) -> bool:
        """Whether to tell the client its audio was dropped: once every TELL_EVERY_S at most."""
        with self._lock:
            now = self._clock()
            if now - self._told < TELL_EVERY_S:
                return False
            self._told = now
            return True


class IdleClock:
    """How long a conversation has gone without use (limits.idle_timeout_s): nothing from its user and no
    reply under way. Every event it emits but an error is use (speech heard, a transcript, a reply), and so
    is every message of the client but audio (the adapter says so: used()); a reply is use from "thinking"
    until the state after "speaking", however long it takes. Audio alone, a silent room's, is not."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock()
        self._replying = False

    def saw(self, event: object) -> None:
        """An event the conversation emits."""
        if isinstance(event, ev.Error):
            return
        if isinstance(event, ev.StateChanged):
            self._replying = event.state in ("thinking", "speaking")
        self._at = self._clock()

    def used(self) -> None:
        """The client sent something other than audio."""
        self._at = self._clock()

    @property
    def idle_s(self) -> float:
        return 0.0 if self._replying else self._clock() - self._at


class ClientSessions:
    """Sessions open per client address, across both WebSocket endpoints (one per app, in its state)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._open: dict[str, int] = {}

    def count(self, address: str) -> int:
        return self._open.get(address, 0)

    @contextmanager
    def hold(self, address: str) -> Iterator[bool]:
        """A place for one session of `address` while the block runs (True), or none left (False); on the
        event loop only, so the check and the count are one step."""
        if self.count(address) >= self.per_client:
            yield False
            return
        self._open[address] = self.count(address) + 1
        try:
            yield True
        finally:
            self._open[address] -= 1
            if not self._open[address]:
                del self._open[address]

