"""When the listener ends a paused turn: at the silence the end rule asks for (app/core/end_rule.py, tested on
its own in test_end_rule.py), once the words' verdict is in; and what it does with audio that comes too fast."""

import asyncio
import threading

import numpy as np

from app.audio import ASR_RATE
from app.core.turns import TurnSettings


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
    # No verdict of the sound alone, and no "unsure" band between answering at the pause and the longest silence:
    # Smart Turn gives this clip 0.977 on one x86-64 CPU and under 0.96 on another, either side of where the
    # default band starts; without the band, unfinished words (logit -9.2) keep any sound below 0.997 waiting.
    settings = TurnSettings(speculate_ms=96, pause_ms=200, end_silence_ms=1500, sure_sound=1.0, unsure_score=-3.0)
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
    heard, listener = await _feed_until_quiet(jfk_pcm, verdict=0.999)
    await asyncio.sleep(0.3)
    assert all(name != "speech_turn" for name, _ in heard.calls._queue)  # 100 ms of silence is too short
    listener.feed(np.zeros(int(0.15 * ASR_RATE), np.float32))
    assert (await _next(heard, "speech_turn"))[3] == "smart"
    listener.end()


async def _unfinished_words(jfk_pcm):
    heard, listener = await _feed_until_quiet(jfk_pcm, verdict=0.0)
    listener.feed(np.zeros(int(0.5 * ASR_RATE), np.float32))
    await asyncio.sleep(0.3)
    assert all(name != "speech_turn" for name, _ in heard.calls._queue)
    listener.feed(np.zeros(int(1.2 * ASR_RATE), np.float32))
    assert (await _next(heard, "speech_turn"))[3] == "silence"
    listener.end()


class _Stalled(_Heard):
    """A conversation whose listener thread stalls (on reading playback_end) until `go` is set: a server too
    busy to hear the audio as fast as it comes."""

    id = "stalled"

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    @property
    def playback_end(self) -> float:
        self.go.wait(30)
        return 0.0


def test_audio_past_the_allowance_is_dropped_and_never_waits_to_be_heard():
    asyncio.run(_past_the_allowance())


async def _past_the_allowance():
    from app.core.events import Options
    from app.core.limits import AudioAllowance
    from app.core.listening import Listener
    from app.engines.vad import load_vad_model

    heard = _Stalled()
    # So fast a clock that only what waits unheard can refuse: the listener is stalled on its first piece.
    listener = Listener(heard, load_vad_model(), TurnSettings(), Options(),
                        allowance=AudioAllowance(1000.0, 3.0))
    second = np.zeros(ASR_RATE, np.float32)
    taken = [listener.feed(second) for _ in range(10)]
    assert taken == [True] * 3 + [False] * 7  # three seconds wait at most, whatever the pace
    name, (error,) = await _next_any(heard)
    assert (name, error.code) == ("emit", "audio_too_fast")  # once, not once per piece
    heard.go.set()
    deadline = asyncio.get_running_loop().time() + 30
    while not listener.feed(second):  # heard now: there is room again
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    listener.end()
    await _next(heard, "recording_ended")


async def _next_any(heard: _Heard) -> tuple:
    return await asyncio.wait_for(heard.calls.get(), timeout=10)
