"""Smart Turn v3.2: from the sound of a turn's last 8 seconds, the probability that the speaker has finished.

The 8.7 MB ONNX model ships inside pipecat's wheel; it is read from the installed distribution and
pipecat itself is never imported (importing it patches asyncio.wait_for for the whole process).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import onnxruntime
from faster_whisper.feature_extractor import FeatureExtractor

from app.audio import ASR_RATE

MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
SECONDS = 8  # the model hears exactly this much: the turn's end, zero-padded in front when shorter
NORM_EPS = 1e-7  # the variance floor of the waveform normalisation it was trained with


def model_path() -> Path:
    return Path(str(importlib.metadata.distribution("pipecat-ai").locate_file(MODEL_FILE)))


class SmartTurn:
    """One loaded model, shared by every listener (InferenceSession.run is thread-safe)."""

    def __init__(self, path: Path | None = None, threads: int = 1) -> None:
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(path or model_path()), providers=["CPUExecutionProvider"], sess_options=opts
        )
        # Whisper's log-mel front end over an 8 s window: 80 bands x 800 frames.
        self._mel = FeatureExtractor(feature_size=80, sampling_rate=ASR_RATE, chunk_length=SECONDS)

    def features(self, audio: np.ndarray) -> np.ndarray:
        """(1, 80, 800) float32 log-mel of the last 8 s of 16 kHz `audio`, as the model was trained:
        zeros in front of a shorter turn, the waveform scaled to zero mean and unit variance."""
        n = SECONDS * ASR_RATE
        x = np.zeros(n, np.float32)
        tail = np.asarray(audio, np.float32)[-n:]
        x[n - len(tail) :] = tail
        x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
        # faster-whisper's extractor keeps 800 of the 801 centred frames, as the model's training did.
        mel = self._mel(x, padding=0)
        return mel[None].astype(np.float32)

    def probability(self, audio: np.ndarray) -> float:
        """How sure the model is that the turn in `audio` (16 kHz mono float32) is finished."""
        (out,) = self._session.run(None, {"input_features": self.features(audio)})
        return float(np.asarray(out).reshape(-1)[0])
