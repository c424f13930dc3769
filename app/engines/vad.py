"""Voice activity: Silero VAD (the copy faster-whisper ships) run as a stream, one 32 ms window at a time.

The network is loaded once per server (Engines) and shared; each recording has its own StreamingVad,
which carries the recurrent state. The turn rules that read its probabilities are app/core/turns.py.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime
from faster_whisper.utils import get_assets_path

WINDOW = 512  # samples per VAD step at 16 kHz (32 ms), fixed by the model
CONTEXT = 64  # samples of the previous window the model sees before each step


def load_vad_model() -> onnxruntime.InferenceSession:
    """The Silero VAD v6 network; one per server, shared (run() is thread-safe)."""
    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class StreamingVad:
    """Silero VAD fed one 32 ms window at a time, carrying its recurrent state between calls.

    The state lives here, not in the model, so each recording has its own StreamingVad.
    """

    def __init__(self, model: onnxruntime.InferenceSession | None = None) -> None:
        self._model = model if model is not None else load_vad_model()
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def __call__(self, window: np.ndarray) -> float:
        """Speech probability of one window of WINDOW float32 samples."""
        assert window.shape == (WINDOW,), window.shape
        x = np.concatenate([self._context, window])[None, :]
        prob, self._h, self._c = self._model.run(None, {"input": x, "h": self._h, "c": self._c})
        self._context = window[-CONTEXT:]
        return float(np.asarray(prob).reshape(-1)[0])
