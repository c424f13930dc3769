"""The conversation core's vocabulary, free of any wire: the options it takes and the events it emits.

A wire protocol (app/web/ws.py for the page's /ws) turns these into its own messages; app/web/ws_protocol.py
gives each event its /ws name.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np

from app.engines.tools import CallDelta, ToolSet

Mode = Literal["hands_free", "push_to_talk"]
State = Literal["idle", "listening", "thinking", "speaking"]
# not_answered: a spoken turn heard and transcribed but not answered (Options.answer_speech off).
EndReason = Literal["completed", "no_speech", "interrupted", "error", "not_answered"]


class Options(msgspec.Struct, frozen=True):
    """What a user may change about their conversation, at any time. `mode` and `end_silence_ms`
    apply at once, also to the turn being spoken; the others from the next reply."""

    system_prompt: str | None = None
    temperature: float | None = None
    end_silence_ms: int | None = None  # silence that ends a spoken turn (None: the server's setting)
    # hands_free: turns end by themselves after end_silence_ms of silence;
    # push_to_talk: a turn is exactly the audio of one recording.
    mode: Mode = "hands_free"
    speaker: int | None = None  # voice of engines that have several (CSM speaker id)
    # False: a spoken turn ends after its Transcript, with TurnEnd "not_answered" and nothing remembered; the
    # adapter keeps it, to answer it when its client asks (typed or pushed-to-talk turns are always answered).
    answer_speech: bool = True
    # False: the user's speech over a reply does not cut it off; it is a turn of its own, answered after it.
    barge_in: bool = True

    def __post_init__(self) -> None:
        if self.end_silence_ms is not None and not 100 <= self.end_silence_ms <= 5000:
            raise ValueError("end_silence_ms must be between 100 and 5000")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be between 0 and 2")
        if self.system_prompt is not None and len(self.system_prompt) > 4000:
            raise ValueError("system_prompt is longer than 4000 characters")


class ReplyRequest(msgspec.Struct, frozen=True):
    """How one reply is to be made, where an adapter asks for more than the conversation's Options (the
    Realtime protocol's per-response settings). The defaults are a reply like any other."""

    instructions: str | None = None  # this reply's system prompt (None: the options')
    tools: ToolSet | None = None  # functions the reply may call instead of answering in words
    voice: bool = True  # False: text only, no voice work at all
    max_tokens: int | None = None  # at most this many tokens (None: the model's setting)
    # The whole context, in place of the conversation's history (an out-of-band reply), which it then
    # leaves as it was.
    context: list[dict[str, Any]] | None = None

    @property
    def remembered(self) -> bool:
        return self.context is None


class StateChanged(msgspec.Struct):
    state: State


class SpeechStarted(msgspec.Struct):
    """Voice activity began; `turn` is the id the user's turn will have. During a reply this is
    barge-in: the reply is cut off and its turn ends "interrupted"."""

    turn: int


class BargeIn(msgspec.Struct):
    """The verdict on speech heard over a reply: confirmed, the reply is cut off (a page that paused its
    playback on hearing the user stops it); not confirmed, it was no person (the reply's own voice coming
    back, a cough) and the reply plays on."""

    confirmed: bool


class SpeechStopped(msgspec.Struct):
    """The user's turn is over (silence long enough, the recording stopped, or the length cap)."""


class Transcript(msgspec.Struct):
    """final=False: an interim guess while the user is still speaking; the final one replaces it."""

    turn: int
    text: str
    final: bool = True


class ReplyText(msgspec.Struct):
    """One more piece of the reply text, in order, as the LLM writes it."""

    turn: int
    delta: str


class ReplyCall(msgspec.Struct):
    """One more piece of a function call the reply makes (a ReplyRequest's tools): the client runs it."""

    turn: int
    call: CallDelta


class ReplyAudioStart(msgspec.Struct):
    """ReplyAudio chunks of this turn follow, until ReplyAudioEnd."""

    turn: int
    sample_rate: int


class ReplyAudio(msgspec.Struct):
    """A chunk of the reply's voice: mono int16 samples, shape (samples,)."""

    turn: int
    pcm: np.ndarray
    sample_rate: int


class ReplyAudioEnd(msgspec.Struct):
    turn: int
    samples: int  # total samples of this turn's reply


class TurnMetrics(msgspec.Struct):
    """Milliseconds from the end of the user's speech (or the typed message) to each stage."""

    turn: int
    end_of_turn_ms: float | None = None
    transcript_ms: float | None = None
    first_token_ms: float | None = None
    first_phrase_ms: float | None = None
    first_audio_ms: float | None = None  # voice-to-voice latency
    total_ms: float | None = None
    input_tokens: int = 0  # the prompt the LLM read, in its tokens
    output_tokens: int = 0  # what it wrote, words and calls


class TurnEnd(msgspec.Struct):
    """Every turn ends with exactly one of these, whatever happened."""

    turn: int
    reason: EndReason
    reply: str = ""  # the reply as the user heard it (may be partial), which the history keeps


class Error(msgspec.Struct):
    """Something went wrong; `message` is meant for the person in the conversation."""

    code: str
    message: str
    turn: int | None = None


# One short message per error code, in words a person understands; the details (exception text,
# what the validator said) go to the server's log, never to the client.
ERROR_MESSAGES: dict[str, str] = {
    "bad_message": "A message from the page was not understood and was skipped.",
    "bad_audio": "Some of the microphone audio could not be read and was skipped.",
    "asr_failed": "Sorry, I could not understand the audio.",
    "llm_failed": "Sorry, I could not write a reply.",
    "tts_failed": "Sorry, I could not speak the reply.",
    "internal_error": "Sorry, something went wrong on the server.",
    "busy": "The assistant is busy with other conversations. Please try again in a moment.",
    "too_long": "That was too long for the assistant. Please make it shorter.",
    "turn_dropped": "Too many messages were waiting, so the oldest one was dropped.",
    "slow_client": "The connection could not keep up, so the rest of this reply's voice was skipped.",
    "load_failed": "The assistant could not start: its models could not be loaded. The server's log says why.",
    "audio_too_fast": "The audio came faster than it can be heard, so some of it was skipped. Send it as it is "
                      "recorded.",
    "too_many_sessions": "Too many conversations are open from this device. Close one and try again.",
    "idle": "Disconnected after {minutes} without use. Talk or type to connect again.",
}


def error(code: str, turn: int | None = None) -> Error:
    """The error event of `code`, with its one message."""
    return Error(code, ERROR_MESSAGES[code], turn)


def idle_error(timeout_s: float) -> Error:
    """The `idle` error of a session closed after `timeout_s` without use, the time in words."""
    count, unit = (round(timeout_s / 60), "minute") if timeout_s >= 60 else (max(1, round(timeout_s)), "second")
    return Error("idle", ERROR_MESSAGES["idle"].format(minutes=f"{count} {unit}{'s' * (count != 1)}"))


Event = (
    StateChanged
    | SpeechStarted
    | SpeechStopped
    | BargeIn
    | Transcript
    | ReplyText
    | ReplyCall
    | ReplyAudioStart
    | ReplyAudio
    | ReplyAudioEnd
    | TurnMetrics
    | TurnEnd
    | Error
)
