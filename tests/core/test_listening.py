"""The end-of-turn rule at a pause: the sound's and the words' opinions, as turns.decide_by says, and
when the listener applies it."""

import asyncio

import msgspec
import numpy as np
import pytest

from app.audio import ASR_RATE
from app.core.listening import finished
from app.core.turns import TurnSettings

SURE, UNSURE = 0.9, 0.01  # both above and below each threshold (0.5 for the sound, 0.1 for the words)


@pytest.mark.parametrize(
    ("decide_by", "sound", "words", "ends"),
    [
        ("words", UNSURE, SURE, True),  # the words decide, whatever the sound
        ("words", SURE, UNSURE, False),  # "And so my fellow Americans." sounds finished: it is not
        ("words", SURE, None, True),  # no words to judge: the sound decides
        ("words", UNSURE, None, False),
        ("words", None, None, False),  # no opinion at all: only the longer silence ends it
        ("sound", SURE, UNSURE, True),
        ("sound", UNSURE, SURE, False),
        ("both", SURE, SURE, True),
        ("both", SURE, UNSURE, False),
        ("both", UNSURE, SURE, False),
        ("both", SURE, None, True),
    ],
)
def test_each_rule_ends_a_turn_only_on_its_evidence(decide_by, sound, words, ends):
    settings = msgspec.structs.replace(TurnSettings(), decide_by=decide_by)
    assert finished(sound, words, settings) is ends


def test_the_thresholds_are_the_settings():
    settings = TurnSettings(smart_turn_threshold=0.8, words_threshold=0.3, decide_by="both")
    assert finished(0.85, 0.35, settings) and not finished(0.75, 0.35, settings)
    assert not finished(0.85, 0.25, settings)


class _Heard:
    """What a Listener hands its conversation (this test isolates the listener's thread)."""

    playback_end = 0.0

    def __init__(self) -> None:
        self.calls: asyncio.Queue = asyncio.Queue()

    def __getattr__(self, name):
        return lambda *args: self.calls.put_nowait((name, args))


async def _next(heard: _Heard, name: str) -> tuple:
    while True:
        got, args = await asyncio.wait_for(heard.calls.get(), timeout=10)
        if got == name:
            return args


async def _feed_until_quiet(jfk_pcm, verdict: float):
    """Speak "And so my fellow Americans" and 96 ms of silence; the words' verdict comes at once."""
    from app.core.events import Options
    from app.core.listening import Listener
    from app.engines.smart_turn import SmartTurn
    from app.engines.vad import load_vad_model

    heard = _Heard()
    settings = TurnSettings(speculate_ms=96, pause_ms=200, end_silence_ms=1500)
    listener = Listener(heard, load_vad_model(), settings, Options(), SmartTurn())
    words = jfk_pcm[: int(2.35 * ASR_RATE)]
    listener.feed(np.concatenate([words, np.zeros(int(0.1 * ASR_RATE), np.float32)]))
    _, audio, _ = await _next(heard, "paused")
    listener.words_judged(audio, verdict)
    return heard, listener


def test_words_judged_before_the_pause_end_the_turn_only_at_the_pause(jfk_pcm):
    asyncio.run(_judged_before_the_pause(jfk_pcm))


def test_unfinished_words_leave_the_turn_to_the_longer_silence(jfk_pcm):
    asyncio.run(_unfinished_words(jfk_pcm))


async def _judged_before_the_pause(jfk_pcm):
    heard, listener = await _feed_until_quiet(jfk_pcm, verdict=0.9)
    await asyncio.sleep(0.3)
    assert all(name != "speech_turn" for name, _ in heard.calls._queue)  # 100 ms of silence is too short
    listener.feed(np.zeros(int(0.15 * ASR_RATE), np.float32))
    assert (await _next(heard, "speech_turn"))[-1] == "smart"
    listener.end()


async def _unfinished_words(jfk_pcm):
    heard, listener = await _feed_until_quiet(jfk_pcm, verdict=0.0)
    listener.feed(np.zeros(int(0.5 * ASR_RATE), np.float32))
    await asyncio.sleep(0.3)
    assert all(name != "speech_turn" for name, _ in heard.calls._queue)
    listener.feed(np.zeros(int(1.2 * ASR_RATE), np.float32))
    assert (await _next(heard, "speech_turn"))[-1] == "silence"
    listener.end()
