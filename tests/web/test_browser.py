"""The real page in headless Chromium against the real server: a spoken turn through a fake microphone,
barge-in, settings kept across a reload, reconnection, pairing a phone with `--lan`, desktop and phone
screenshots, no console errors."""

from __future__ import annotations

import json
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import recording, resample

CHROMIUM = Path("/usr/bin/chromium")
# A person's question (tests/data/turns, Picovoice's speech-to-intent set, Apache-2.0), not our own Piper voice:
# said over a reply in that voice, Piper's words score up to 0.63 on the echo check (at 8% of the alignments
# against a story; the gate rejects from 0.5), and the barge-in was once rejected as echo; people's voices
# score at most 0.39 on the same story.
QUESTION_FILE, HEARD = "turns/picovoice-bba4cd55-2ed4.flac", "coffee"  # "Can I have a medium rose coffee with sugar?"
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
# Of 60 replies from the cpu preset (issue 31's prompt, its temperature), the shortest ran 62 words; asked for "a long
# story about a dragon and a knight", one in 60 was 12 words ("The story of King Arthur and Queen Morgalla."), over
# before a test could speak or cough over it.
STORY = "Tell me a story about a brave little dragon."
PIRATE_SETTINGS = {"mode": "push_to_talk", "speaker": None, "system_prompt": "Answer like a pirate.",
                   "temperature": 0.5, "end_silence_ms": 900}
PIRATE_HELLO = {"type": "hello", **PIRATE_SETTINGS}
# Screenshots of every run, for a person to look at (bench-results/ is git-ignored).
SCREENSHOTS = Path(__file__).resolve().parents[2] / "bench-results" / "screenshots"
# How far the first reply has been revealed, how many turns ended, and the state shown.
PROGRESS_JS = """() => {
  const va = window.voiceAssistant, text = document.querySelector(".bubble.assistant .text");
  return {shown: text ? text.textContent.length : 0, ended: va.turnEnds.length, state: va.state};
}"""
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium")


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
    speech = recording(QUESTION_FILE, MIC_RATE)
    lead, tail = np.zeros(MIC_RATE // 2), np.zeros(3 * MIC_RATE)
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, np.concatenate([lead, speech, tail]), MIC_RATE)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    """Playwright, once for the module (its sync API runs one instance at a time)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright, question_wav: Path) -> Iterator[object]:
    """One headless Chromium for the module; its fake microphone says the question each time it is opened."""
    # %noloop: play the file once per opened microphone, then silence, so the question is not asked again and again.
    mic_flag = f"--use-file-for-fake-audio-capture={question_wav}%noloop"
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_FLAGS, mic_flag])
    yield chromium
    chromium.close()


def test_spoken_turn_then_barge_in(live_server: str, browser) -> None:
    """Desktop: a spoken question goes through the states in order, the reply's text follows its voice
    and the orb its level; then the user talks over a long reply, which stops at once."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors, frames = watch_errors(page), Frames(page)
    try:
        page.goto(f"{live_server}/")
        page.get_by_role("button", name="Start talking").click(timeout=60_000)
        reveal = follow_turn(page, frames, turns=1)
        seen = snapshot(page)
        assert in_order(["idle", "listening", "thinking", "speaking"], seen["states"]), seen
        assert "error" not in seen["states"], seen
        assert any(re.search(HEARD, t, re.I) for t in seen["transcripts"]), seen
        # Chromium has WebCodecs: the page wrote the recording's Ogg/Opus itself (not MediaRecorder's WebM).
        assert [m["mime_type"] for m in frames.sent if m["type"] == "audio_start"][:1] == ["audio/ogg;codecs=opus"]
        assert seen["outputLevelMax"] > 0.2 and seen["micLevelMax"] > 0.05, seen  # levels drove the orb
        # The reply's first audible sample is kept on the playback clock (benchmarks/bench_heard.py); the
        # microphone is tapped only with ?tap.
        heard = page.evaluate("() => window.voiceAssistant.heard")
        assert [h["turn"] for h in heard] == [seen["turnEnds"][0]["turn"]] and heard[0]["time"] > 0, heard
        assert page.evaluate("() => window.voiceAssistant.micLevels") == []
        # The reply text ran ahead of its voice on the wire, yet the page held it back until spoken...
        assert any(0 < shown < received for shown, received in reveal), reveal
        # ...and once played, all of it shows, with the turn's latency beside it.
        reply = seen["turnEnds"][0]["reply"]
        shown = page.locator(".bubble.assistant .text").first.text_content()
        assert shown.split() == reply.split()  # the page shows the phrases spoken: the reply's line breaks as spaces
        assert re.fullmatch(r"voice after \d+\.\d\d s", page.locator(".meta").first.text_content())
        page.screenshot(path=str(SCREENSHOTS / "desktop.png"))

        barge_in(page, frames)
        assert not errors, f"console errors: {errors}"
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "desktop-failed.png"), full_page=True)
        print(f"page state: {snapshot(page)}")
        raise
    finally:
        page.close()


@pytest.fixture(scope="module")
def coughing_browser(playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A second Chromium whose fake microphone hears, 0.6 s after it opens, one short burst of a voice
    (300 ms cut from a word of JFK's, as loud as he speaks): a cough's length, too short to be a turn."""
    burst = resample(recording("jfk.flac")[int(1.2 * 16_000) : int(1.5 * 16_000)], 16_000, MIC_RATE)
    path = tmp_path_factory.mktemp("cough") / "cough.wav"
    write_wav(path, np.concatenate([np.zeros(int(0.6 * MIC_RATE)), burst, np.zeros(3 * MIC_RATE)]), MIC_RATE)
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        *CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={path}%noloop"])
    yield chromium
    chromium.close()


def test_a_cough_over_the_reply_pauses_it_only_until_the_server_says_it_was_not_the_user(
    live_server: str, coughing_browser
) -> None:
    """The page's own detector pauses the reply on the burst; the server's gate turns the burst down
    (`barge_in` not confirmed) and the reply plays on to its end, nothing of it cut."""
    page = coughing_browser.new_page(viewport={"width": 1280, "height": 800})
    errors, frames = watch_errors(page), Frames(page)
    try:
        page.goto(f"{live_server}/")
        page.wait_for_function("() => window.voiceAssistant.state === 'idle'", timeout=60_000)
        page.get_by_label("Type a message").fill(STORY)
        page.get_by_label("Type a message").press("Enter")
        page.wait_for_function("() => window.voiceAssistant.outputLevel > 0.05", timeout=TURN_TIMEOUT_MS)
        page.get_by_role("button", name="Start talking").click()
        page.wait_for_function("() => window.voiceAssistant.bargeIns.some((b) => b.verdict)", timeout=10_000)
        # The worklet's word that it fell silent may come after a quick verdict: it comes, or the page never paused.
        page.wait_for_function("() => window.voiceAssistant.bargeIns[0].quietAt !== null", timeout=2_000)
        (heard,) = page.evaluate("() => window.voiceAssistant.bargeIns")
        assert heard["verdict"] == "rejected" and heard["quietAt"] is not None, heard
        follow_turn(page, frames, turns=1)  # the story plays out
        ends = snapshot(page)["turnEnds"]
        assert [e["reason"] for e in ends] == ["completed"], ends
        assert "interrupt" not in [m["type"] for m in frames.sent] and not of_kind(frames, "speech_started")
        print(f"paused for {(heard['verdictAt'] - heard['quietAt']) * 1000:.0f} ms: {heard}")
        assert not errors, f"console errors: {errors}"
    finally:
        page.close()


def of_kind(frames: Frames, kind: str) -> list[dict]:
    return [m for m in frames.received if m["type"] == kind]


def test_a_recording_that_fails_is_said_in_words_and_the_microphone_goes_off(live_server: str, browser) -> None:
    """The page's own Opus encoder breaks (here on purpose): the page says so and stops listening, instead
    of showing "Listening" while nothing reaches the server."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.add_init_script("AudioEncoder.prototype.encode = function () { throw new Error('the encoder broke'); };")
    errors, frames = watch_errors(page), Frames(page)
    try:
        page.goto(f"{live_server}/")
        page.get_by_role("button", name="Start talking").click(timeout=60_000)
        alert = page.get_by_role("alert")
        alert.wait_for(state="visible", timeout=30_000)
        assert "The microphone stopped: the encoder broke" in alert.text_content()
        page.get_by_role("button", name="Start talking").wait_for(timeout=30_000)  # the microphone is off
        assert page.evaluate("() => window.voiceAssistant.state") != "listening"
        assert "audio_start" not in [m["type"] for m in frames.sent]  # nothing was recorded, nothing sent
        assert not errors, f"console errors: {errors}"
    finally:
        page.close()


def test_pairing_a_phone_by_the_link_from_the_log(paired_server, browser) -> None:
    """`--lan`: an unpaired phone is told how to pair; the link from the log pairs it with an HttpOnly,
    Secure, SameSite=Strict `__Host-` cookie of its own and moves on to the clean address, where the page
    connects and its settings show the certificate's fingerprint and the paired devices; forgetting
    itself there unpairs it (all under the page's Content-Security-Policy: no console error)."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  ignore_https_errors=True)  # the phone accepted the self-signed certificate
    page = context.new_page()
    errors = watch_errors(page)
    try:
        page.goto(f"{paired_server.url}/")
        assert "not paired yet" in page.locator("main").text_content()
        errors.clear()  # that page's own 401; from here on nothing may fail
        page.goto(f"{paired_server.url}/?token={paired_server.token}")
        assert page.url == f"{paired_server.url}/"  # the token leaves the address bar and the history
        (cookie,) = context.cookies()
        assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")
        assert cookie["name"] == "__Host-va_device" and cookie["value"] != paired_server.token
        page.wait_for_function("() => window.voiceAssistant.state === 'idle'", timeout=60_000)  # /ws with the cookie
        page.get_by_role("button", name="Settings").click()
        assert page.locator("#settings .fingerprint").text_content() == paired_server.fingerprint
        mine = page.locator("#devices li", has_text="(this device)")
        mine.wait_for(timeout=10_000)  # the list, loaded by htmx
        page.screenshot(path=str(SCREENSHOTS / "phone-paired-settings.png"))
        mine.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "phone-paired-devices.png"))
        mine.get_by_role("button", name="Forget").click()  # htmx posts; the answer reloads the page
        page.locator("main.pairing").wait_for(timeout=10_000)
        assert "not paired yet" in page.locator("main").text_content() and context.cookies() == []
        assert not [e for e in errors if "401" not in e], f"console errors: {errors}"  # the pairing page's own 401
    finally:
        context.close()


def barge_in(page, frames: Frames) -> None:
    """Ask for a long story by text; while it plays, open the microphone: the question cuts it off."""
    page.get_by_role("button", name="Stop talking").click()
    page.get_by_label("Type a message").fill(STORY)
    page.get_by_label("Type a message").press("Enter")
    page.wait_for_function("() => window.voiceAssistant.outputLevel > 0.05", timeout=TURN_TIMEOUT_MS)
    page.screenshot(path=str(SCREENSHOTS / "desktop-speaking.png"))
    page.get_by_role("button", name="Start talking").click()
    follow_turn(page, frames, turns=3)  # the story (interrupted), then the question again
    interrupts = [m for m in frames.sent if m["type"] == "interrupt"]
    assert interrupts and interrupts[0]["played_samples"] > 0, frames.sent  # what was heard, for the history
    ends = snapshot(page)["turnEnds"]
    # The server ends the story "interrupted" if it was still writing it, or "completed" if all of it had been
    # sent (the cpu preset's replies are short since issue 31: two sentences can be made in 0.8 s); either way
    # the page stopped it, marked it interrupted (below) and told the server what was heard (above).
    assert ends[1]["reason"] in ("interrupted", "completed") and ends[2]["reason"] == "completed", ends
    # The page paused the story itself as soon as its own detector heard the question begin, before the
    # server's verdict, which then confirmed it. Both times are the page's AudioContext clock.
    (heard,) = page.evaluate("() => window.voiceAssistant.bargeIns")
    quiet_after = heard["quietAt"] - heard["onsetAt"]
    print(f"the page was quiet {quiet_after * 1000:.0f} ms after the interrupting speech began, the server's "
          f"verdict came after {(heard['verdictAt'] - heard['onsetAt']) * 1000:.0f} ms: {heard}")
    assert heard["verdict"] == "confirmed" and 0 < quiet_after <= 0.3, heard
    assert "interrupted" in page.locator(".bubble.assistant").nth(1).get_attribute("class").split()
    page.screenshot(path=str(SCREENSHOTS / "desktop-barge-in.png"))


def test_phone_settings_persist_and_survive_a_dropped_connection(live_server: str, browser) -> None:
    """Phone-sized: settings are kept in the browser and sent as `hello` on change, after a reload and
    after the connection drops; push-to-talk by holding the button; the conversation on screen stays
    through the reconnection."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    page = context.new_page()
    errors, frames = watch_errors(page), Frames(page)
    sockets = []
    page.route_web_socket("**/ws", lambda ws: (sockets.append(ws), ws.connect_to_server()))
    try:
        page.goto(f"{live_server}/")
        page.wait_for_function("() => window.voiceAssistant.state === 'idle'")
        page.screenshot(path=str(SCREENSHOTS / "phone.png"))
        change_settings(page)
        assert frames.sent[-1] == PIRATE_HELLO, frames.sent  # sent when changed
        page.screenshot(path=str(SCREENSHOTS / "phone-settings.png"))

        page.reload()
        page.wait_for_function("() => window.voiceAssistant.state === 'idle'")
        assert page.evaluate("() => window.voiceAssistant.settings") == {**PIRATE_SETTINGS}
        assert page.get_by_label("Push-to-talk").is_checked()
        assert page.get_by_role("button", name="Hold or tap to talk").is_visible()
        wait_until(page, lambda: frames.sent and frames.sent[-1] == PIRATE_HELLO)  # sent when a session starts

        push_to_talk(page, frames)

        page.get_by_label("Type a message").fill("Hello there")
        page.get_by_role("button", name="Send").click()
        hellos = len([m for m in frames.sent if m["type"] == "hello"])
        sockets[-1].close(code=1011, reason="test: the network dropped")
        page.get_by_text("Disconnected from the server").wait_for()
        page.wait_for_function("() => window.voiceAssistant.state === 'idle'", timeout=30_000)
        assert page.locator(".bubble.user .text").last.text_content() == "Hello there"  # kept on screen
        assert page.locator(".divider").is_visible()
        assert len([m for m in frames.sent if m["type"] == "hello"]) == hellos + 1
        assert page.get_by_role("alert").is_hidden()  # the "disconnected" message went away
        page.screenshot(path=str(SCREENSHOTS / "phone-reconnected.png"))
        assert not errors, f"console errors: {errors}"
    finally:
        context.close()


def push_to_talk(page, frames: Frames) -> None:
    """Hold the talk button (pointer down ... up, as a finger does): the turn is what was said meanwhile."""
    button = page.get_by_role("button", name="Hold or tap to talk")
    box = button.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    wait_for_the_question_said(page)
    assert page.get_by_role("button", name="Release to send").get_attribute("aria-pressed") == "true"
    assert "audio_stop" not in [m["type"] for m in frames.sent]  # nothing ends the turn while held
    page.mouse.up()
    page.wait_for_function("() => window.voiceAssistant.turnEnds.length > 0", timeout=TURN_TIMEOUT_MS)
    kinds = [m["type"] for m in frames.sent]
    assert kinds.index("audio_start") < kinds.index("audio_stop"), kinds
    assert any(re.search(HEARD, t, re.I) for t in snapshot(page)["transcripts"])


def wait_for_the_question_said(page) -> None:
    """Until the microphone has heard speech and then a second of quiet: the fake microphone has
    said the whole question (it plays the file once, then silence)."""
    page.wait_for_function("""() => {
      const now = performance.now();
      if (window.voiceAssistant.micLevel > 0.05) window.lastLoudAt = now;
      return window.lastLoudAt !== undefined && now - window.lastLoudAt > 1000;
    }""", polling=50, timeout=30_000)


def change_settings(page) -> None:
    page.get_by_role("button", name="Settings").click()
    assert page.get_by_label("Voice", exact=True).is_hidden()  # Piper has one voice: no choice to offer
    page.get_by_label("Push-to-talk").check()
    page.get_by_label("Instructions for the assistant (system prompt)").fill(PIRATE_SETTINGS["system_prompt"])
    page.get_by_label("Creativity (temperature)").fill(str(PIRATE_SETTINGS["temperature"]))
    page.get_by_label("Pause before it answers").fill(str(PIRATE_SETTINGS["end_silence_ms"]))
    page.get_by_label("Instructions for the assistant (system prompt)").blur()


class Frames:
    """The JSON messages the page sends and receives over its WebSocket (binary frames are skipped)."""

    def __init__(self, page) -> None:
        self.sent: list[dict] = []
        self.received: list[dict] = []
        page.on("websocket", self._watch)

    def _watch(self, ws) -> None:
        ws.on("framesent", lambda data: self._add(self.sent, data))
        ws.on("framereceived", lambda data: self._add(self.received, data))

    @staticmethod
    def _add(into: list[dict], data: str | bytes) -> None:
        if isinstance(data, str):
            into.append(json.loads(data))

    def reply_text(self) -> str:
        return "".join(m["delta"] for m in self.received if m["type"] == "reply_text")


def follow_turn(page, frames: Frames, *, turns: int) -> list[tuple[int, int]]:
    """Poll until `turns` turns have ended and their audio has played out; returns, per poll, the length
    of the first reply as shown and as received so far."""
    deadline = time.monotonic() + TURN_TIMEOUT_MS / 1000
    samples: list[tuple[int, int]] = []
    while time.monotonic() < deadline:
        state = page.evaluate(PROGRESS_JS)
        samples.append((state["shown"], len(frames.reply_text())))
        if state["ended"] >= turns and state["state"] != "speaking":
            return samples
        page.wait_for_timeout(100)
    raise AssertionError(f"{turns} turn(s) not finished in time")


def wait_until(page, condition, timeout_s: float = 10) -> None:
    """Poll a Python-side condition while the page's events keep being delivered."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(50)


def snapshot(page) -> dict:
    return page.evaluate("""() => {
      const va = window.voiceAssistant;
      return {states: va.states, transcripts: va.transcripts, turnEnds: va.turnEnds,
        outputLevelMax: va.outputLevelMax, micLevelMax: va.micLevelMax,
        error: document.getElementById("error-text").textContent};
    }""")


def in_order(expected: list[str], seen: list[str]) -> bool:
    """`expected` is a subsequence of `seen`."""
    rest = iter(seen)
    return all(state in rest for state in expected)

def watch_errors(page) -> list[str]:
    """Collect console errors and uncaught exceptions; the page should log none."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    return errors


def test_a_session_closed_as_unused_waits_for_the_user_and_typing_connects_again(cpu_settings, engines,
                                                                                 browser) -> None:
    """Closed for want of use (`idle`), the page says so and does not reconnect by itself in a loop; typing a
    message connects again and sends it."""
    from app.web.server import create_app
    from tests.support import serving
    from tests.web.test_limits import limited

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors, frames = watch_errors(page), Frames(page)
    opened: list[str] = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    try:
        # The shared models, as live_server's (a server of the test's own engines drains them with asyncio.run,
        # which Playwright's loop forbids).
        with serving(create_app(limited(cpu_settings, idle_timeout_s=3.0), engines)) as url:
            page.goto(f"{url}/")
            page.wait_for_function("() => window.voiceAssistant.state === 'idle'", timeout=60_000)
            page.get_by_text("Disconnected after 3 seconds without use").wait_for(timeout=30_000)
            assert page.get_by_role("button", name="Reconnect").is_visible()
            page.wait_for_timeout(5000)  # the page retried a lost connection after 1 s; not this one
            assert len(opened) == 1 and page.evaluate("() => window.voiceAssistant.state") == "idle", opened
            page.screenshot(path=str(SCREENSHOTS / "idle.png"))
            page.get_by_label("Type a message").fill("Hello there")
            page.get_by_label("Type a message").press("Enter")
            page.wait_for_function("() => window.voiceAssistant.turnEnds.length > 0", timeout=TURN_TIMEOUT_MS)
        assert len(opened) == 2, opened
        assert {"type": "text", "text": "Hello there"} in frames.sent
        assert page.evaluate("() => window.voiceAssistant.turnEnds")[0]["reason"] == "completed"
        assert not errors, f"console errors: {errors}"
    finally:
        page.close()
