"""Smart Turn: our features and probabilities against pipecat's own analyzer, on real speech."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from app.audio import ASR_RATE
from app.engines.smart_turn import SmartTurn

# Cuts of the real recording, in seconds: mid-sentence clauses, the whole of it (longer than the
# model's 8 s window, so only its end is heard), and one short enough to be mostly zero padding.
CUTS = [(0.0, 0.8), (0.0, 2.0), (0.0, 4.0), (0.0, 6.5), (0.0, 11.0), (2.5, 11.0), (4.0, 7.2), (5.0, 11.0)]
# Cuts the model sets clearly apart (at least 1.8 logit between neighbours, beyond what the front end's
# rounding moves either side: see LOGIT_TOLERANCE): the opening words, a clause, the whole sentence, its last
# clause. Their order must be the same exactly. The first three cuts lie within 0.3 of each other: their
# order is rounding.
RANKED = [(0.0, 2.0), (0.0, 6.5), (0.0, 11.0), (5.0, 11.0)]

# pipecat is imported only in a child process: importing it patches asyncio.wait_for process-wide.
PIPECAT = """
import json, sys
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from tests.support import recording
analyzer = LocalSmartTurnAnalyzerV3()
pcm = recording("jfk.flac")
cuts = json.loads(sys.argv[1])
print(json.dumps([analyzer._predict_endpoint(pcm[int(a * 16000):int(b * 16000)])["probability"] for a, b in cuts]))
"""


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurn:
    return SmartTurn()


def pipecat_probabilities(cuts: list[tuple[float, float]]) -> list[float]:
    out = subprocess.run([sys.executable, "-c", PIPECAT, json.dumps(cuts)], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def clip(pcm: np.ndarray, start: float, end: float) -> np.ndarray:
    return pcm[int(start * ASR_RATE) : int(end * ASR_RATE)]


# How close our probabilities must be to pipecat's, in logits. Smart Turn v3.2's CPU model is int8-quantised: its
# logit moves in steps of ~0.039, and a float32 rounding difference in the log-mel front end can push an
# activation across a step. Ours is faster-whisper's extractor, pipecat's its own numpy copy of Whisper's; they
# agree to ~1.5e-5 a bin, but which way each rounds depends on the CPU's FFT kernels. Measured on an AMD EPYC:
# 0 to 0.04 logit between the two on these cuts (0 on the CPU the test was written on); transformers' extractor
# instead of ours moved one cut by 0.39, random +-2e-5 per-bin noise any cut by at most 0.75. A real mistake
# is far larger: zero padding at the wrong end of the 8 s window moves these cuts by 2.4 to 5.8.
LOGIT_TOLERANCE = 1.0


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_probabilities_match_pipecats_analyzer(smart_turn, jfk_pcm):
    theirs = pipecat_probabilities(CUTS)
    ours = [smart_turn.probability(clip(jfk_pcm, a, b)) for a, b in CUTS]
    pairs = list(zip(ours, theirs, strict=True))
    assert all(abs(logit(o) - logit(t)) <= LOGIT_TOLERANCE for o, t in pairs), pairs
    assert [o >= 0.5 for o in ours] == [t >= 0.5 for t in theirs]  # every decision, exactly
    assert max(theirs) - min(theirs) > 0.5  # the cuts are judged differently: the comparison means something
    ranked = [CUTS.index(cut) for cut in RANKED]
    assert list(np.argsort([ours[i] for i in ranked])) == list(np.argsort([theirs[i] for i in ranked])), pairs


def test_features_are_whisper_log_mels_of_the_padded_normalised_window(smart_turn, jfk_pcm):
    from transformers import WhisperFeatureExtractor

    reference = WhisperFeatureExtractor(chunk_length=8)
    audio = clip(jfk_pcm, 0.0, 2.0)
    padded = np.concatenate([np.zeros(8 * ASR_RATE - len(audio), np.float32), audio])  # zeros in front
    expected = reference(padded, sampling_rate=ASR_RATE, do_normalize=True, return_tensors="np").input_features
    ours = smart_turn.features(audio)
    assert ours.shape == expected.shape == (1, 80, 800)
    assert np.abs(ours - expected).max() < 1e-4


def test_a_finished_sentence_scores_higher_than_its_opening_words(smart_turn, jfk_pcm):
    whole = smart_turn.probability(jfk_pcm)  # "... ask what you can do for your country."
    opening = smart_turn.probability(clip(jfk_pcm, 0.0, 2.0))  # "And so my fellow Americans"
    assert whole > 0.5 > opening
