"""End-of-turn decisions on real speech, from the streaming VAD's probabilities."""

import numpy as np
import pytest

from app.audio import ASR_RATE
from app.core.turns import Event, TurnDetector, TurnSettings
from app.engines.vad import WINDOW, StreamingVad

PAUSES = (Event.QUIET, Event.PAUSED, Event.RESUMED)


def feed_stream(detector: TurnDetector, audio: np.ndarray, block: int = 1600, interim: bool = False,
                pauses: bool = False):
    """Feed 100 ms blocks; return [(event, stream position in samples)], INTERIM, QUIET, PAUSED
    and RESUMED only if asked."""
    out = []
    for i in range(0, len(audio), block):
        for event in detector.feed(audio[i : i + block]):
            if (interim or event is not Event.INTERIM) and (pauses or event not in PAUSES):
                out.append((event, detector.position))
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * ASR_RATE), dtype=np.float32)


def test_one_turn_ends_after_the_configured_silence(jfk_pcm):
    settings = TurnSettings(end_silence_ms=1500)  # JFK's own pauses are shorter than this
    detector = TurnDetector(settings, StreamingVad())
    events = feed_stream(detector, np.concatenate([silence(1), jfk_pcm, silence(3)]))
    assert [e for e, _ in events] == [Event.SPEECH_STARTED, Event.TURN_ENDED]
    audio, speech_end, ended_by = detector.take_turn()
    assert ended_by == "silence"
    decided_at = events[1][1]
    waited_ms = (decided_at - speech_end) / ASR_RATE * 1000
    assert 1500 <= waited_ms <= 1500 + 150, waited_ms  # decided one 100 ms block after the silence
    assert 10.0 < len(audio) / ASR_RATE < 11.5  # the speech, padded, without the trailing silence
    assert speech_end / ASR_RATE == pytest.approx(1 + 10.9, abs=0.4)


def test_default_settings_split_at_long_pauses(jfk_pcm):
    detector = TurnDetector(TurnSettings(end_silence_ms=600), StreamingVad())
    events = feed_stream(detector, np.concatenate([jfk_pcm, silence(2)]))
    ends = [e for e, _ in events if e is Event.TURN_ENDED]
    assert len(ends) >= 2  # "And so my fellow Americans ..." then a pause of almost a second


def test_a_short_burst_does_not_start_a_turn(jfk_pcm):
    detector = TurnDetector(TurnSettings(min_speech_ms=400), StreamingVad())
    # 0.25 s cut from the middle of a word, between silences: a cough-length sound.
    burst = jfk_pcm[int(1.2 * ASR_RATE) : int(1.45 * ASR_RATE)]
    events = feed_stream(detector, np.concatenate([silence(1), burst, silence(2)]))
    assert events == []
    assert detector.flush() is None


def test_endless_speech_is_cut_at_the_cap(jfk_pcm):
    detector = TurnDetector(TurnSettings(max_turn_s=3), StreamingVad())
    events = feed_stream(detector, jfk_pcm)
    assert Event.TURN_ENDED in [e for e, _ in events]
    audio, _, _ = detector.take_turn()
    assert len(audio) <= 3 * ASR_RATE + WINDOW


def test_flush_ends_a_turn_in_progress(jfk_pcm):
    detector = TurnDetector(TurnSettings(end_silence_ms=2000), StreamingVad())
    events = feed_stream(detector, jfk_pcm[: 3 * ASR_RATE])
    assert [e for e, _ in events] == [Event.SPEECH_STARTED]
    assert detector.flush() is Event.TURN_ENDED
    audio, _, _ = detector.take_turn()
    assert len(audio) > ASR_RATE


def test_interim_snapshots_come_during_speech_only(jfk_pcm):
    detector = TurnDetector(TurnSettings(end_silence_ms=1500, interim_every_ms=1000), StreamingVad())
    seen = []
    for i in range(0, len(jfk_pcm) + 2 * ASR_RATE, 1600):
        block = np.concatenate([jfk_pcm, silence(2)])[i : i + 1600]
        for event in detector.feed(block):
            if event is Event.INTERIM:
                seen.append(len(detector.snapshot()))
            elif event is Event.TURN_ENDED:
                break
    assert 5 <= len(seen) <= 11  # about one a second of an 11 s turn
    assert seen == sorted(seen) and seen[0] >= ASR_RATE  # the snapshot grows


def test_barge_in_needs_confident_sustained_speech(jfk_pcm):
    burst = jfk_pcm[int(1.2 * ASR_RATE) : int(1.65 * ASR_RATE)]  # 450 ms cut from a word
    # Strict, it is turned down, and said to be (a page that held its playback on it plays on).
    for strict, expected in ((False, [Event.SPEECH_STARTED]), (True, [Event.REJECTED])):
        detector = TurnDetector(TurnSettings(end_silence_ms=2000), StreamingVad())
        detector.strict = strict
        events = feed_stream(detector, np.concatenate([silence(0.5), burst, silence(0.5)]))
        assert [e for e, _ in events] == expected, strict
    detector = TurnDetector(TurnSettings(), StreamingVad())
    detector.strict = True
    events = feed_stream(detector, jfk_pcm[: 3 * ASR_RATE])  # the user really talks
    assert events and events[0][0] is Event.SPEECH_STARTED


def test_push_to_talk_never_ends_on_silence(jfk_pcm):
    detector = TurnDetector(TurnSettings(), StreamingVad(), push_to_talk=True)
    events = feed_stream(detector, np.concatenate([jfk_pcm, silence(3)]))
    assert [e for e, _ in events] == [Event.SPEECH_STARTED]  # JFK's pauses do not cut it
    assert detector.flush() is Event.TURN_ENDED
    audio, _, _ = detector.take_turn()
    assert len(audio) / ASR_RATE > 10


def test_switching_to_push_to_talk_mid_turn_keeps_the_pauses_inside_it(jfk_pcm):
    head, rest = jfk_pcm[: int(1.5 * ASR_RATE)], jfk_pcm[int(1.5 * ASR_RATE) :]  # speech, no pause yet
    detector = TurnDetector(TurnSettings(end_silence_ms=500), StreamingVad())  # would end at ~2.8 s
    assert [e for e, _ in feed_stream(detector, head)] == [Event.SPEECH_STARTED]
    detector.set_end(push_to_talk=True)
    assert feed_stream(detector, np.concatenate([rest, silence(3)])) == []
    assert detector.flush() is Event.TURN_ENDED
    audio, _, _ = detector.take_turn()
    assert len(audio) / ASR_RATE > 10  # all of it, one turn


def test_a_new_pause_applies_to_the_turn_in_progress(jfk_pcm):
    head, pause = jfk_pcm[: int(1.5 * ASR_RATE)], jfk_pcm[int(1.5 * ASR_RATE) : 3 * ASR_RATE]
    detector = TurnDetector(TurnSettings(), StreamingVad(), push_to_talk=True)
    assert [e for e, _ in feed_stream(detector, head)] == [Event.SPEECH_STARTED]
    detector.set_end(end_silence_ms=300)  # hands-free now: the first pause (2.25-3.3 s) ends it
    events = feed_stream(detector, pause)
    assert [e for e, _ in events] == [Event.TURN_ENDED]
    _, speech_end, _ = detector.take_turn()
    waited_ms = (events[0][1] - speech_end) / ASR_RATE * 1000
    assert 300 <= waited_ms <= 300 + 150, waited_ms


def test_settings_are_validated():
    with pytest.raises(ValueError):
        TurnSettings(speech_threshold=0.3, silence_threshold=0.5)
    with pytest.raises(ValueError):
        TurnSettings(end_silence_ms=10)
    with pytest.raises(ValueError):  # speculation must start no later than a turn may end
        TurnSettings(speculate_ms=250, pause_ms=200)
    with pytest.raises(ValueError):  # a candidate must already hold all of the turn's audio
        TurnSettings(tail_ms=128, speculate_ms=96)


def test_a_pause_is_reported_once_and_speech_after_it_voids_it(jfk_pcm):
    detector = TurnDetector(TurnSettings(pause_ms=200, end_silence_ms=1500), StreamingVad())
    events = [e for e, _ in feed_stream(detector, np.concatenate([jfk_pcm, silence(2)]), pauses=True)]
    assert events[0] is Event.SPEECH_STARTED and events[-1] is Event.TURN_ENDED
    # JFK pauses several times: each silence is QUIET first, PAUSED if it lasts, and every one but
    # the last is followed by speech.
    silences = [s.split() for s in " ".join(e.value for e in events[1:-1]).split("resumed")]
    assert silences.count(["quiet", "paused"]) >= 2 and silences[-1] == ["quiet", "paused"]
    assert all(s in (["quiet"], ["quiet", "paused"]) for s in silences)


def test_a_candidate_is_exactly_the_turn_that_ends_without_more_speech(jfk_pcm):
    detector = TurnDetector(TurnSettings(pause_ms=200, end_silence_ms=1500), StreamingVad())
    candidates = []
    for i in range(0, len(jfk_pcm) + 2 * ASR_RATE, WINDOW):
        block = np.concatenate([jfk_pcm, silence(2)])[i : i + WINDOW]
        for event in detector.feed(block):
            if event in (Event.QUIET, Event.PAUSED):
                candidates.append((event, *detector.candidate()))
    audio, speech_end, _ = detector.take_turn()
    (quiet, quiet_audio, quiet_end), (paused, last_audio, last_end) = candidates[-2:]
    assert (quiet, paused) == (Event.QUIET, Event.PAUSED)
    # What speculation starts on at the first short silence is already exactly the finished turn.
    assert quiet_end == last_end == speech_end and np.array_equal(quiet_audio, audio)
    assert np.array_equal(last_audio, audio)
    assert all(len(a) < len(audio) for _, a, _ in candidates[:-2])  # earlier silences: shorter, void


def test_speculation_starts_at_a_shorter_silence_than_a_turn_may_end(jfk_pcm):
    settings = TurnSettings(speculate_ms=96, pause_ms=200, end_silence_ms=1500)
    detector = TurnDetector(settings, StreamingVad())
    at = {}
    for i in range(0, int(3.2 * ASR_RATE), WINDOW):  # "And so my fellow Americans", then its pause
        for event in detector.feed(jfk_pcm[i : i + WINDOW]):
            at.setdefault(event, detector.position)
    _, speech_end = detector.candidate()
    ms = {event: (position - speech_end) / 16 for event, position in at.items()}
    assert 96 <= ms[Event.QUIET] < 96 + 32 and 200 <= ms[Event.PAUSED] < 200 + 32


def test_end_now_ends_the_paused_turn_there(jfk_pcm):
    detector = TurnDetector(TurnSettings(pause_ms=200, end_silence_ms=1500), StreamingVad())
    for i in range(0, len(jfk_pcm), WINDOW):
        if Event.PAUSED in detector.feed(jfk_pcm[i : i + WINDOW]):
            break
    expected, _ = detector.candidate()
    assert detector.end_now() is Event.TURN_ENDED
    audio, _, ended_by = detector.take_turn()
    assert ended_by == "smart"
    assert np.array_equal(audio, expected) and 1.0 < len(audio) / ASR_RATE < 4.0  # the first clause
    # The stream goes on: the rest of the speech is a turn of its own.
    rest = feed_stream(detector, np.concatenate([jfk_pcm[i + WINDOW :], silence(2)]))
    assert [e for e, _ in rest][:1] == [Event.SPEECH_STARTED]


def test_no_pause_is_reported_in_push_to_talk_or_past_the_end_silence(jfk_pcm):
    stream = np.concatenate([jfk_pcm, silence(2)])
    detector = TurnDetector(TurnSettings(), StreamingVad(), push_to_talk=True)
    assert not {Event.QUIET, Event.PAUSED} & {e for e, _ in feed_stream(detector, stream, pauses=True)}
    detector = TurnDetector(TurnSettings(pause_ms=300), StreamingVad())
    detector.set_end(end_silence_ms=250)  # the silence rule ends the turn before any pause
    events = [e for e, _ in feed_stream(detector, stream, pauses=True)]
    assert Event.PAUSED not in events and Event.QUIET in events  # speculation still helps it


def test_a_late_accepted_barge_in_keeps_its_first_words_and_onset(jfk_pcm):
    """Under the strict gate JFK's weak "ask not" (3.3-4.3 s, Silero 0.4-0.75) is accepted only with
    "what your country" (5.4 s): the turn still starts at "ask", and says its speech began there."""
    rest = jfk_pcm[int(2.9 * ASR_RATE) :]
    detector = TurnDetector(TurnSettings(), StreamingVad())
    detector.strict = True
    events = feed_stream(detector, rest)
    started = [at for e, at in events if e is Event.SPEECH_STARTED][0]
    assert started / ASR_RATE + 2.9 > 5.4  # accepted late...
    assert detector.onset / ASR_RATE + 2.9 == pytest.approx(3.3, abs=0.1)  # ...with the onset of "ask"
    before_start = len(detector.snapshot()) - (detector.position - started)  # pre-roll the turn began with
    assert before_start >= started - detector.onset + detector.settings.pad_ms * ASR_RATE // 1000 - WINDOW
