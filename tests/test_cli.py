"""The `voice-assistant serve` command: clear one-line errors, and a real start on the cpu preset."""

import json
import os
import subprocess
import sys
import time
import urllib.request

from app.cli import main
from tests.conftest import free_port


def test_bad_setting_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv("VA_LLM__TEMPERATURE", "hot")
    assert main(["serve", "--preset", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "llm.temperature" in err and "Traceback" not in err


def test_missing_model_names_the_slot(capsys):
    assert main(["serve", "--preset", "cpu", "--llm-model", "/nowhere/model.gguf"]) == 1
    err = capsys.readouterr().err
    assert "llm model '/nowhere/model.gguf': no such file" in err


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
    assert "warmed up" in output  # every model ran once before the port opened


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            return json.loads(urllib.request.urlopen(url, timeout=2).read())
        except OSError:
            time.sleep(0.3)
    raise AssertionError("server did not answer /health in time")


def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))


def test_auto_gpu_without_network_falls_back_to_cpu(monkeypatch, tmp_path):
    import pytest

    from app.cli import load_engines
    from app.config import load_settings
    from app.models import ModelError

    offline_hub(monkeypatch, tmp_path)
    gpu = load_settings("gpu", environ={})
    with pytest.raises(ModelError, match="asr model 'hf:"):
        load_engines(gpu, fallback=False)  # asked for gpu by name: say what is missing
    settings, engines = load_engines(gpu, fallback=True)  # picked automatically: run offline
    try:
        assert settings.preset == "cpu" and engines.tts.name == "piper"
    finally:
        engines.close()
