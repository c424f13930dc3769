"""How much silence ends a paused turn, from Smart Turn's verdict on the sound and the LLM's on the words."""

import math

import pytest

from app.core.end_rule import WAIT_FOR_WORDS, EndRule, logit
from app.core.turns import TurnSettings

SETTINGS = TurnSettings()
FUSED, SOUND = EndRule(SETTINGS), EndRule(TurnSettings(decide_by="sound"))
PAUSE, UNSURE, LONGEST = SETTINGS.pause_ms, SETTINGS.unsure_silence_ms, SETTINGS.end_silence_ms


def score_words(sound: float, score: float) -> float:
    """The words' probability that gives `sound` the fused score `score`."""
    return 1 / (1 + math.exp(logit(sound) - score))


def test_a_sure_sound_ends_at_the_pause_without_waiting_for_the_words():
    assert FUSED.silence_needed_ms(0.99, None, words_due=True) == PAUSE
    assert SOUND.silence_needed_ms(0.99, None) == PAUSE


def test_an_unsure_sound_waits_for_the_words_that_are_coming():
    assert FUSED.silence_needed_ms(SETTINGS.sure_sound - 0.05, None, words_due=True) == WAIT_FOR_WORDS


@pytest.mark.parametrize(
    ("score", "needed"),
    [(SETTINGS.finished_score + 0.1, PAUSE), (SETTINGS.finished_score - 0.1, UNSURE),
     (SETTINGS.unsure_score + 0.1, UNSURE), (SETTINGS.unsure_score - 0.1, LONGEST)],
)
def test_the_fused_score_picks_the_silence(score, needed):
    sound = 0.5
    assert FUSED.silence_needed_ms(sound, score_words(sound, score)) == needed


def test_a_finished_clause_after_an_unsure_sound_ends_at_the_pause():
    # Smart Turn at 0.6, the LLM at 0.1: logit 0.41 - 2.20 = -1.79, over finished_score.
    assert FUSED.silence_needed_ms(0.6, 0.1) == PAUSE
    # The same sound after "with": the LLM reads 0.000, the score is under unsure_score.
    assert FUSED.silence_needed_ms(0.6, 0.0) == LONGEST


def test_without_a_verdict_on_the_words_the_sound_alone_decides():
    for rule in (FUSED, SOUND):
        assert rule.silence_needed_ms(0.5, None) == UNSURE
        assert rule.silence_needed_ms(SETTINGS.unsure_sound / 2, None) == LONGEST
    assert SOUND.silence_needed_ms(0.5, 0.0) == UNSURE  # "sound" never reads the words
    assert not SOUND.reads_words and FUSED.reads_words


def test_without_smart_turn_only_the_longest_silence_ends_the_turn():
    assert FUSED.silence_needed_ms(None, 0.99) == LONGEST


def test_a_probability_of_zero_still_leaves_the_other_verdict_a_say():
    assert math.isfinite(logit(0.0)) and math.isfinite(logit(1.0))
    assert logit(0.0) < logit(1e-3) < 0 < logit(0.999) < logit(1.0)


def test_the_settings_keep_the_schedule_in_order():
    with pytest.raises(ValueError):
        TurnSettings(unsure_score=0.0, finished_score=-1.0)
    with pytest.raises(ValueError):
        TurnSettings(unsure_silence_ms=100, pause_ms=192)
    with pytest.raises(ValueError):
        TurnSettings(unsure_sound=0.99, sure_sound=0.98)


# ------------------------------------------------------------ on real speech, with the real models


def _by_id(uid: str):
    from tests.turn_set import load

    return next(u for u in load() if u.id == uid)


def _outcome(engines, cpu_settings, uid: str, rule_name: str = "default"):
    """What a rule of benchmarks/bench_turns.py makes of one recording of the turn set, in stream time (the
    models' own compute time is what the benchmark adds; here it would make the test depend on the CPU)."""
    from benchmarks.bench_turns import Judges, outcome, rules

    utterance = _by_id(uid)
    judges = Judges(cpu_settings.turns, engines.vad_model, engines.smart_turn, engines.asr, engines.llm)
    gaps = judges.gaps(utterance)
    for gap in gaps:
        gap.sound_ms = gap.words_ms = 0.0
    rule, turns = rules(cpu_settings.turns)[rule_name]
    return outcome(gaps, utterance.end_s, rule, turns)


def test_a_finished_real_statement_is_answered_within_the_target(engines, cpu_settings):
    # "I'd like a ... " by a speaker of the held-out half: Smart Turn and the LLM both hear it finished.
    result = _outcome(engines, cpu_settings, "picovoice-19b33c87-f765")
    assert not result.cut
    assert result.delay_ms <= 300  # the median target; the pause itself (pause_ms) is 224 ms of it


def test_a_real_sentence_with_a_thinking_pause_is_one_turn(engines, cpu_settings):
    # The same sentence with 0.70 s of its own room tone after a function word in its middle.
    paused = "picovoice-19b33c87-f765+pause"
    result = _outcome(engines, cpu_settings, paused)
    assert not result.cut and result.delay_ms <= 300
    assert _outcome(engines, cpu_settings, paused, "silence").cut  # the old 500 ms rule cuts it there


def test_the_zero_cut_floor_makes_a_finished_sentence_outwait_a_pause_that_sounds_as_finished():
    """bench_turns' bound: a sentence whose end sounds no more finished than a pause inside another must wait
    that pause out under any rule that never waits less for a less finished turn; a surer end need not."""
    import numpy as np

    from benchmarks.bench_turns import Gap, zero_cut_floor
    from tests.turn_set import Utterance

    def said(uid: str, end_s: float) -> Utterance:
        return Utterance(uid, np.zeros(1, np.float32), "statement", uid, "tune", "", end_s)

    def gap(start_s: float, length_s: float, sound: float, words: float) -> Gap:
        return Gap(start_s, length_s, sound, words, "", 0.0, 0.0)

    gaps = {
        "clauses": [gap(1.0, 0.4, 0.95, 0.1), gap(3.0, math.inf, 0.99, 0.3)],  # a pause that sounds finished
        "unsure": [gap(2.0, math.inf, 0.9, 0.05)],  # ends no surer than that pause: must outwait its 0.4 s
    }
    utterances = [said("clauses", 2.95), said("unsure", 1.9)]
    floor = zero_cut_floor(utterances, gaps)["statement"]
    # "clauses" ends surer than its own pause: 50 ms (where the detector hears the end); "unsure": 100 + 400 + 32.
    assert floor["median_ms"] == round((50 + 532) / 2)
    assert floor["p90_ms"] == round(50 + 0.9 * (532 - 50))
