"""Start-up progress behind an open port: download progress in words, /health 503 then 200, the
WebSocket while loading (the loading thread's phases: test_startup.py; GPU memory: test_gpu_memory.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app import startup
from app.config import load_settings
from app.core.events import ERROR_MESSAGES
from app.engines import loading
from app.engines.loaded import Engines
from app.engines.loading import DownloadProgress, progress_text, watch_hub_download
from tests.support import RecordingStatus, serving

# ---------------------------------------------------------------- progress in words


def test_progress_text_reads_like_a_person_would_say_it():
    assert progress_text("CSM checkpoint", 3_100_000_000, 6_200_000_000) == (
        "downloading CSM checkpoint 3.1 of 6.2 GB (50%)"
    )
    assert progress_text("Mimi codec", 120_000_000, 385_000_000) == "downloading Mimi codec 120 of 385 MB (31%)"
    assert progress_text("language model", 42_000_000, 0) == "downloading language model: 42 MB so far"


def test_tqdm_like_progress_feeds_the_status_and_logs_every_10_s(caplog):
    now = [0.0]
    status = RecordingStatus()
    progress = DownloadProgress("CSM checkpoint", 6_200_000_000, status=status, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="app.engines.loading"):
        for _ in range(30):  # 30 s of 100 MB a second
            now[0] += 1.0
            progress.update(100_000_000)
        progress.close()
    assert status.history[-2] == loading.LoadState(
        "downloading", "downloading CSM checkpoint 3.0 of 6.2 GB (48%)", 3_000_000_000, 6_200_000_000
    )
    assert status.state.phase == "loading" and "downloaded CSM checkpoint" in status.state.message
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if line.startswith("downloading")]) == 3  # at 10, 20 and 30 s
    assert lines[-1] == "downloaded CSM checkpoint (3000 MB)"


def test_watching_the_cache_folder_counts_a_download(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "POLL_S", 0.01)
    blobs = tmp_path / "models--owner--repo" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "cached").write_bytes(b"x" * 5000)  # already there: not part of this download
    sizes: list[int] = []
    status = RecordingStatus()

    with watch_hub_download("owner/repo", "voice", status=status, total=lambda: sizes.append(1) or 3_000_000):
        part = blobs / ".abc.incomplete.tmp"  # written through a temporary file, like hf_xet
        for _ in range(3):
            with part.open("ab") as f:
                f.write(b"\0" * 1_000_000)
            time.sleep(0.05)
        part.rename(blobs / "abc")
    downloading = [s for s in status.history if s.phase == "downloading"]
    assert len(downloading) >= 2 and downloading[-1].done_bytes == 3_000_000
    assert downloading[-1].message == "downloading voice 3 of 3 MB (100%)"
    assert sizes == [1]  # the size was asked once
    assert status.state.message == "downloaded voice"

    quiet = RecordingStatus()
    with watch_hub_download("owner/repo", "voice", status=quiet, total=lambda: sizes.append(2) or 1):
        time.sleep(0.05)  # a cached file: nothing arrives
    assert quiet.history == [] and sizes == [1]


def test_hub_download_reports_progress_through_models(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants as c

    from app.engines import models

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # a hub that answers (the fake below)
    monkeypatch.setattr(loading, "POLL_S", 0.01)
    monkeypatch.setattr(models, "hub_file_size", lambda repo, filename, token=None: 2_000_000)

    def fake_download(repo, filename, token=None):
        blobs = Path(tmp_path) / f"models--{repo.replace('/', '--')}" / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / "f.incomplete").write_bytes(b"\0" * 1_000_000)
        time.sleep(0.05)
        (blobs / "f.incomplete").write_bytes(b"\0" * 2_000_000)
        (blobs / "f.incomplete").rename(blobs / "f")
        return str(blobs / "f")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    status = RecordingStatus()
    path = models.resolve("hf:owner/repo/model.gguf", "llm", status)
    assert path.name == "f"
    assert "downloading language model 2 of 2 MB (100%)" in [s.message for s in status.history]


# ---------------------------------------------------------------- the server while it loads


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def first_event_then_close(base_url: str) -> tuple[dict, int | None]:
    with connect(base_url.replace("http", "ws") + "/ws") as ws:
        event = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    return event, closed.value.rcvd.code if closed.value.rcvd else None


def test_health_says_loading_until_ready_and_the_websocket_is_told(monkeypatch, cpu_settings, engines):
    from app.web.server import create_app

    gate = threading.Event()

    def held_load(settings, *, fallback, status):
        status.set("downloading", "downloading voice 1 of 2 GB (50%)", 1_000_000_000, 2_000_000_000)
        gate.wait(30)
        # The session's models in a fresh Engines: closing it at shutdown stops only its own workers.
        return settings, Engines(engines.asr, engines.llm, engines.tts)

    monkeypatch.setattr(startup, "load_engines", held_load)
    with serving(create_app(cpu_settings)) as url:
        deadline = time.monotonic() + 10
        while (health := get(url + "/health"))[1].find("downloading") < 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        code, body = health
        assert code == 503
        assert json.loads(body) == {
            "status": "loading", "preset": "cpu", "phase": "downloading",
            "message": "downloading voice 1 of 2 GB (50%)", "done_bytes": 1_000_000_000, "total_bytes": 2_000_000_000,
        }
        code, fragment = get(url + "/status")
        assert code == 200 and "Starting</span> · downloading voice 1 of 2 GB (50%)" in fragment
        assert 'hx-trigger="load delay:1s"' in fragment  # polls itself faster while loading

        event, close_code = first_event_then_close(url)
        assert event["type"] == "error" and event["code"] == "loading"
        assert "still starting" in event["message"] and close_code == 1013

        gate.set()
        deadline = time.monotonic() + 10
        while (health := get(url + "/health"))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads(health[1])["status"] == "ok"
        code, fragment = get(url + "/status")
        assert "Ready" in fragment and "hx-trigger" not in fragment
        with connect(url.replace("http", "ws") + "/ws") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "ready"


def test_a_failed_load_is_500_with_the_reason_in_the_log_only(cpu_settings, app_log):
    from app.web.server import LOAD_FAILED, create_app

    broken = load_settings("cpu", {"llm": {"model": "/nowhere/model.gguf"}}, environ={})
    app = create_app(broken)
    with serving(app) as url:
        app.state.loading.wait(30)
        code, body = get(url + "/health")
        assert code == 500
        # The reason names the server's paths: the log says it, /health and the page say where to look.
        assert json.loads(body) == {"status": "failed", "error": LOAD_FAILED}
        assert "the server log says why" in LOAD_FAILED
        status = get(url + "/status")[1]
        assert "Could not start" in status and LOAD_FAILED in status and "/nowhere" not in status
        reason = "llm model '/nowhere/model.gguf': no such file or folder. Check the path you configured."
        assert reason in app_log.text
        event, close_code = first_event_then_close(url)
        assert event == {"type": "error", "code": "load_failed", "message": ERROR_MESSAGES["load_failed"], "turn": None}
        assert "/nowhere" not in event["message"]  # the page gets words, not the server's paths
