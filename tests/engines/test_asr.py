"""faster-whisper tiny.en on real speech, and the CUDA 12 cuBLAS its GPU path loads."""

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import numpy as np
import pytest

from tests.support import JFK_TEXT, words


def test_tiny_en_transcribes_jfk(engines, jfk_pcm):
    text = engines.asr.transcribe(jfk_pcm)
    assert words(text) == words(JFK_TEXT)


def test_silence_and_noise_give_no_text(engines):
    assert engines.asr.transcribe(np.zeros(16_000, np.float32)) == ""
    assert engines.asr.transcribe(np.zeros(0, np.float32)) == ""
    noise = np.random.default_rng(0).normal(0, 0.05, 32_000).astype(np.float32)
    assert engines.asr.transcribe(noise) == ""


def test_a_turn_cut_mid_sentence_gives_only_its_own_words(engines, jfk_pcm):
    # What the end-of-turn detector hands over: the speech up to a pause (JFK's second, at 7.9 s).
    heard = engines.asr.transcribe(jfk_pcm[: int(7.9 * 16_000)])
    assert words(heard) == words("And so my fellow Americans, ask not what your country can do for you")


def _whole_window(engines):
    from app.engines.asr import Transcriber

    return Transcriber(msgspec.structs.replace(engines.asr.settings, fit_window_s=0.0), engines.asr._model)


def test_the_fitted_window_hears_what_the_whole_window_hears(engines, jfk_pcm):
    assert engines.asr._fitted is not None  # the cpu preset's path
    whole = _whole_window(engines)
    assert whole._fitted is None
    for seconds in (11.0, 7.9):
        turn = jfk_pcm[: int(seconds * 16_000)]
        assert words(engines.asr.transcribe(turn)) == words(whole.transcribe(turn))


def test_a_turn_longer_than_the_window_is_decoded_whole(engines, jfk_pcm):
    long_turn = np.concatenate([jfk_pcm] * 3)  # 33 s
    assert engines.asr._fitted.transcribe(long_turn) is None
    heard = words(engines.asr.transcribe(long_turn))  # faster-whisper's own 30 s windows, in turn
    assert len(heard) >= 2.5 * len(words(JFK_TEXT)) and heard[:5] == words("And so my fellow Americans")


def test_a_decoding_loop_falls_back_to_the_whole_window(engines, jfk_pcm):
    # Without the silent tail the decoder repeats "And so my fellow Americans" to its length limit:
    # the fitted window must see that and give the turn to the whole-window path.
    from app.engines.asr import FittedWindow, Transcriber

    turn = jfk_pcm[: int(3.3 * 16_000)]
    asr = Transcriber(engines.asr.settings, engines.asr._model)
    tailless = asr._fitted
    assert isinstance(tailless, FittedWindow)
    tailless._tail = tailless._tail[:, :1]
    assert tailless.transcribe(turn) is None
    assert words(asr.transcribe(turn)) in (words("And so my fellow Americans"), words("And so am I fellow Americans"))


def _ctranslate2_library() -> bytes:
    import ctranslate2

    folder = Path(ctranslate2.__file__).parent
    found = [*folder.glob("libctranslate2*.so*"), *(folder.parent / "ctranslate2.libs").glob("libctranslate2*.so*")]
    assert found, "no libctranslate2 shared library beside the ctranslate2 package"
    return found[0].read_bytes()


# Run in a clean process: a library loaded globally stays loaded, and the system's search path must not help.
CUBLAS_PROBE = textwrap.dedent("""
    import ctypes
    from app.engines.asr import load_cuda12_cublas
    try:
        ctypes.CDLL("libcublas.so.12")
        print("system")
    except OSError:
        print(load_cuda12_cublas())
        major = ctypes.c_int()
        assert ctypes.CDLL("libcublas.so.12").cublasGetProperty(0, ctypes.byref(major)) == 0  # 0: MAJOR_VERSION
        print(major.value)
""")


@pytest.mark.cuda
@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="nvidia-cublas-cu12 ships for x86-64 Linux only"
)
def test_cublas_12_for_ctranslate2_is_loadable_by_name():
    # CTranslate2 on a GPU dlopens cuBLAS by the name of the CUDA major version it was built for...
    library = _ctranslate2_library()
    assert b"libcublas.so.12\x00" in library, "CTranslate2 wants another cuBLAS: update nvidia-cublas-cu12"
    # ...which the gpu preset must answer from the wheel, with no LD_LIBRARY_PATH.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    done = subprocess.run([sys.executable, "-c", CUBLAS_PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    if lines == ["system"]:
        pytest.skip("this machine has a system libcublas.so.12, so the wheel's loading cannot be told apart")
    path, major = lines
    assert path.endswith("nvidia/cublas/lib/libcublas.so.12")
    assert major == "12"
