"""Telling the assistant's own voice, heard back by the microphone, from a person: real speech (JFK) and
the cpu preset's real voice, compared the way the strict barge-in gate compares them."""

from __future__ import annotations

import time

import numpy as np

from app.audio import ASR_RATE
from app.core.echo import EchoCheck, EchoGuard
from tests.support import resample

RUN = 6144  # what the strict gate looks at: barge_in_min_speech_ms of 32 ms windows (384 ms)
STORY = ("Once upon a time, in a land far away, there lived a brave dragon who loved to sing songs to the "
         "knights of the castle. Every morning he flew over the hills.")


def test_the_reply_heard_back_is_echo_and_a_person_over_it_is_not(steady_voice, jfk_pcm):
    reply = np.concatenate(list(steady_voice.synthesize(STORY)))
    voice = resample(reply.astype(np.float32) / 32768, steady_voice.sample_rate, ASR_RATE)
    guard, t0 = EchoGuard(), time.perf_counter()  # it keeps what plays from now on
    guard.played(reply, steady_voice.sample_rate, t0)  # as the server sends it: int16 at the voice's rate
    noise = np.random.default_rng(0).normal(0, 0.002, RUN).astype(np.float32)
    echo, person = [], []
    for i, end in enumerate(np.arange(1.0, len(voice) / ASR_RATE - 0.2, 0.37)):
        delay = (0.0, 0.12, 0.25, 0.4)[i % 4]
        heard = voice[int((end - delay) * ASR_RATE) - RUN : int((end - delay) * ASR_RATE)]
        if np.mean(np.sqrt((heard.reshape(-1, 512) ** 2).mean(axis=1)) > 0.01) < 0.6:
            continue  # mostly a pause between phrases: no speech for the gate to judge
        echo.append(guard.similarity(0.3 * heard + noise, t0 + end))
        words = jfk_pcm[int((0.4 + (i * 0.83) % 9.5) * ASR_RATE) :][:RUN]
        if np.sqrt((words**2).mean()) > 0.02:
            person.append(guard.similarity(words + 0.03 * heard + noise, t0 + end))  # the echo 20 dB under him
    threshold = guard.settings.echo_threshold
    print(f"echo {min(echo):.2f}-{max(echo):.2f} (median {np.median(echo):.2f}), "
          f"a person {min(person):.2f}-{max(person):.2f} (median {np.median(person):.2f})")
    assert len(echo) >= 12 and len(person) >= 6
    assert min(echo) >= threshold > max(person)
    assert guard.similarity(voice[:RUN], t0 - 5) == 0.0  # nothing played then: nothing to be the echo of


def test_speech_right_after_an_echo_must_be_heard_twice():
    """A cough over the echo makes one run look foreign; the user is heard over it in two runs in a row."""
    verdicts = iter([True, False, False, False, False])
    guard = type("Guard", (), {"is_echo": lambda self, audio, t_end: next(verdicts)})()
    check = EchoCheck(guard, time_of=lambda position: position / ASR_RATE)  # type: ignore[arg-type]
    audio = np.zeros(RUN, np.float32)
    assert [check(audio, ASR_RATE * s) for s in (10, 10.4, 10.8, 11.2)] == [True, None, False, False]
    assert check(audio, ASR_RATE * 20) is False  # long after the echo: believed at once
