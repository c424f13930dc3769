"""Silero VAD as a stream, on real speech."""

import numpy as np

from app.engines.vad import WINDOW, StreamingVad


def test_vad_scores_speech_high_and_silence_low(jfk_pcm):
    vad = StreamingVad()
    probs = [vad(jfk_pcm[i : i + WINDOW]) for i in range(0, len(jfk_pcm) - WINDOW, WINDOW)]
    vad.reset()
    quiet = [vad(np.zeros(WINDOW, np.float32)) for _ in range(30)]
    assert max(quiet) < 0.2
    assert np.mean(np.array(probs) > 0.5) > 0.4  # JFK speaks most of those 11 s
