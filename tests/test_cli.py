"""The `voice-assistant serve` command: clear one-line errors, and a real start on the cpu preset
(the port opens at once; /health says "loading" until every model is warm)."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from app.cli import main
from tests.support import free_port


def test_bad_setting_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("VA_LLM__TEMPERATURE", "hot")
    assert main(["serve", "--preset", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "llm.temperature" in err and "Traceback" not in err


def test_missing_model_names_the_slot():
    # The port opens first; the load fails behind it and ends the server with the one-line reason.
    # (A subprocess: the app configures logging onto the stderr it finds, which capsys would close.)
    argv = ["serve", "--preset", "cpu", "--port", str(free_port()), "--llm-model", "/nowhere/model.gguf"]
    done = subprocess.run([sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "voice-assistant: llm model '/nowhere/model.gguf': no such file or folder. Check the path you configured."
    )
    assert "Traceback" not in done.stderr


def test_serve_starts_offline_and_answers_health():
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the cpu preset must never need the hub
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--preset", "cpu", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        assert health == {**health, "status": "ok", "preset": "cpu"}
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert output.index("warmed up") < output.index("ready: preset cpu")  # every model ran once first


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The body of the first 200 from /health; a 503 ("loading") or a refused connection means wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            return json.loads(urllib.request.urlopen(url, timeout=2).read())
        except urllib.error.HTTPError as error:
            assert error.code == 503 and json.loads(error.read())["status"] == "loading"
            time.sleep(0.1)
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not answer /health in time")


def test_wyoming_flags_set_the_wyoming_server():
    from app.cli import flag_overrides, parse_args

    assert flag_overrides(parse_args(["serve", "--wyoming", "10300", "--zeroconf"]))["wyoming"] == {
        "port": 10300, "zeroconf": True}
    assert "wyoming" not in flag_overrides(parse_args(["serve"]))


def test_serve_with_wyoming_answers_home_assistant_beside_the_web_server():
    """`serve --wyoming PORT` as the README says: `info` at once (also while the models load), then a voice."""
    import asyncio

    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize

    port, wyoming = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--preset", "cpu", "--port", str(port), "--wyoming", str(wyoming)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    async def ask(event, until: str):
        async with AsyncTcpClient("127.0.0.1", wyoming) as client:
            await client.write_event(event)
            while (answer := await client.read_event()).type != until:
                pass
            return answer

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                info = Info.from_event(asyncio.run(ask(Describe().event(), "info")))
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no Wyoming port"
                time.sleep(0.1)
        assert info.tts[0].supports_synthesize_streaming
        wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        start = asyncio.run(ask(Synthesize(text="Hello.").event(), "audio-start"))
        assert start.data["rate"] == 22050
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"wyoming: listening on 127.0.0.1:{wyoming}" in output


def test_a_wyoming_port_in_use_is_one_clear_line(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--preset", "cpu", "--port", str(free_port()), "--wyoming", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"voice-assistant: the Wyoming port 127.0.0.1:{port} cannot be used (")
    assert "Traceback" not in err
