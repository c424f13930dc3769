"""The per-session bounds of app/core/limits.py on a clock of the test's own: how far audio may run ahead of
real time, when a session counts as unused, and the sessions of one client address."""

from __future__ import annotations

import pytest

from app.core import events as ev
from app.core.limits import AudioAllowance, ClientSessions, IdleClock, LimitSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sent(allowance: AudioAllowance, clock: Clock, *, speed: float, seconds: float, piece_s: float = 0.1) -> float:
    """Seconds heard of `seconds` of audio sent in pieces at `speed` times real time."""
    heard = 0.0
    for _ in range(round(seconds / piece_s)):
        heard += piece_s if allowance.take(piece_s) else 0.0
        clock.now += piece_s / speed
    return heard


def test_audio_at_real_time_is_never_refused_however_long():
    clock = Clock()
    allowance = AudioAllowance(2.0, 3.0, clock=clock)
    assert sent(allowance, clock, speed=1.0, seconds=3600) == pytest.approx(3600)


def test_a_whole_recording_at_once_fits_in_the_burst():
    clock = Clock()
    allowance = AudioAllowance(2.0, 30.0, clock=clock)
    assert all(allowance.take(10.0) for _ in range(3))  # three appends of ten seconds, no time between
    assert not allowance.take(0.1)
    clock.now += 1.0
    assert allowance.take(2.0) and not allowance.take(0.1)  # two seconds back each second


def test_audio_at_four_times_real_time_is_heard_at_twice_it_after_the_burst():
    clock = Clock()
    allowance = AudioAllowance(2.0, 3.0, clock=clock)
    heard = sent(allowance, clock, speed=4.0, seconds=40)  # ten seconds of wall time
    assert 3.0 + 2.0 * 10 - 0.2 <= heard <= 3.0 + 2.0 * 10 + 0.1


def test_audio_is_refused_while_the_listener_is_a_burst_behind():
    allowance = AudioAllowance(2.0, 3.0, clock=Clock())
    assert allowance.take(0.5, waiting_s=2.5)
    assert not allowance.take(0.5, waiting_s=2.6)  # the bucket has room, the listener has not


def test_what_is_heard_and_dropped_is_counted():
    counted: list[tuple[str, float]] = []
    allowance = AudioAllowance(2.0, 1.0, counted=lambda fate, s: counted.append((fate, s)), clock=Clock())
    allowance.take(0.75)
    allowance.take(0.5)
    assert counted == [("heard", 0.75), ("dropped", 0.5)]


def test_the_client_is_told_once_a_second_at_most():
    clock = Clock()
    allowance = AudioAllowance(2.0, 1.0, clock=clock)
    told = []
    for _ in range(30):  # three seconds of refusals, ten a second
        told.append(allowance.tell_now())
        clock.now += 0.1
    assert sum(told) == 3 and told[0]


def test_an_allowance_is_made_from_the_settings():
    allowance = AudioAllowance.of(LimitSettings(max_audio_speed=3.0, max_audio_burst_s=5.0))
    assert (allowance.speed, allowance.burst_s) == (3.0, 5.0)


@pytest.mark.parametrize("wrong", [{"max_audio_speed": 0.5}, {"max_audio_burst_s": 0.0},
                                   {"max_pending_audio_bytes": 1000}, {"idle_timeout_s": -1.0},
                                   {"max_sessions_per_client": 0}])
def test_limits_out_of_range_are_refused(wrong):
    with pytest.raises(ValueError):
        LimitSettings(**wrong)


# ---------------------------------------------------------------- idle


def test_only_the_user_or_a_reply_keep_a_session_in_use():
    clock = Clock()
    idle = IdleClock(clock)
    clock.now += 5
    assert idle.idle_s == 5
    idle.saw(ev.error("audio_too_fast"))  # an error is not use
    assert idle.idle_s == 5
    idle.saw(ev.SpeechStarted(1))  # speech heard is
    assert idle.idle_s == 0
    clock.now += 2
    idle.used()  # a message from the client
    assert idle.idle_s == 0


def test_a_reply_is_use_for_as_long_as_it_takes():
    clock = Clock()
    idle = IdleClock(clock)
    idle.saw(ev.StateChanged("thinking"))
    clock.now += 600  # a model slow to write its first word
    assert idle.idle_s == 0
    idle.saw(ev.StateChanged("speaking"))
    clock.now += 600
    assert idle.idle_s == 0
    idle.saw(ev.StateChanged("listening"))  # the reply is over: unused from now on
    clock.now += 7
    assert idle.idle_s == 7


# ---------------------------------------------------------------- sessions of one client


def test_one_address_holds_at_most_its_share_and_a_closed_session_frees_its_place():
    sessions = ClientSessions(per_client=2)
    with sessions.hold("10.0.0.2") as first, sessions.hold("10.0.0.2") as second:
        assert first and second
        with sessions.hold("10.0.0.2") as third, sessions.hold("10.0.0.3") as other:
            assert not third and other  # another address has its own share
        assert sessions.count("10.0.0.2") == 2 and sessions.count("10.0.0.3") == 0
    with pytest.raises(RuntimeError), sessions.hold("10.0.0.2"):
        raise RuntimeError("the session ended badly")
    assert sessions.count("10.0.0.2") == 0
