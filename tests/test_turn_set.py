"""The real-speech turn-taking set is what issue 27 asks of it, and its paused versions are made right."""

from collections import Counter

import numpy as np

from app.audio import ASR_RATE
from tests.turn_set import load, manifest, with_pause


def test_the_set_has_enough_real_speech_of_every_kind_split_by_speaker():
    entries = manifest()
    assert len(entries) >= 60 and len({e["speaker"] for e in entries}) >= 5
    assert Counter(e["kind"] for e in entries).keys() == {"question", "statement", "command"}
    halves: dict[str, set[str]] = {}
    for e in entries:
        halves.setdefault(e["speaker"], set()).add(e["half"])
    assert all(len(h) == 1 for h in halves.values())  # no voice on both sides
    assert {e["half"] for e in entries} == {"tune", "heldout"}
    assert sum("pause" in e for e in entries) >= 15


def test_each_true_end_lies_within_its_recording_after_some_speech():
    for u in load(paused=False):
        assert 1.0 <= u.end_s <= len(u.audio) / ASR_RATE
        assert np.abs(u.audio[: int(u.end_s * ASR_RATE)]).max() > 0.05  # speech, not silence


def test_a_paused_version_inserts_room_tone_at_the_pause_and_moves_the_end():
    u = next(u for u in load(paused=False) if u.end_s > 3)
    paused = with_pause(u, 1.5, 0.8)
    n = int(0.8 * ASR_RATE)
    assert len(paused.audio) == len(u.audio) + n and paused.end_s == u.end_s + 0.8
    at = int(1.5 * ASR_RATE)
    np.testing.assert_array_equal(paused.audio[: at - 80], u.audio[: at - 80])
    np.testing.assert_array_equal(paused.audio[at + n + 80 :], u.audio[at + 80 :])
    gap = paused.audio[at : at + n]
    loudest = np.sqrt(np.mean(u.audio[: int(u.end_s * ASR_RATE)] ** 2))
    assert np.sqrt(np.mean(gap**2)) < loudest / 10  # quiet, as the recording's own quiet is
    assert paused.paused and paused.category == "paused" and paused.id == u.id + "+pause"
