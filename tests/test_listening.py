"""The end-of-turn rule at a pause: the sound's and the words' opinions, as turns.decide_by says."""

import msgspec
import pytest

from app.listening import finished
from app.turns import TurnSettings

SURE, UNSURE = 0.9, 0.01  # both above and below each threshold (0.5 for the sound, 0.05 for the words)


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
