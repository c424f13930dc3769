"""Fetching: every model file on disk before any model loads, CSM's through its own loader."""

from __future__ import annotations

import json
from pathlib import Path

from app import startup
from app.config import load_settings
from app.engines.fetching import fetch_models
from app.engines.tts.csm import engine as csm_engine
from app.engines.tts.csm.loader import CsmFiles
from tests.support import RecordingStatus


def test_the_cpu_models_become_local_paths(cpu_settings):
    status = RecordingStatus()
    local = fetch_models(cpu_settings.asr, cpu_settings.llm, cpu_settings.tts, status)
    assert (Path(local.asr.model) / "model.bin").is_file()
    assert Path(local.llm.model).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert local.csm is None and local.tts == cpu_settings.tts  # Piper resolves its own file
    assert [(s.phase, s.message) for s in status.history] == [("loading", "checking the model files")]


def test_csm_files_are_found_by_its_loader_and_handed_to_its_engine(monkeypatch, tmp_path):
    for name in ("ckpt.safetensors", "tokenizer.json", "mimi.safetensors"):
        (tmp_path / name).write_bytes(b"{}")
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 500000.0}))
    folder = str(tmp_path)  # every reference a folder: each picks its own file from it
    csm = {"model": folder, "tokenizer": folder, "mimi": folder, "mimi_file": "mimi.safetensors"}
    settings = load_settings("cpu", {"tts": {"engine": "csm", "csm": csm}}, environ={})
    local = fetch_models(settings.asr, settings.llm, settings.tts, RecordingStatus())
    assert local.csm == CsmFiles(
        checkpoint=[tmp_path / "ckpt.safetensors"], tokenizer=tmp_path / "tokenizer.json",
        mimi=tmp_path / "mimi.safetensors", hints={"rope_theta": 500000.0},
    )
    seen = []
    monkeypatch.setattr(csm_engine, "load_csm_engine", lambda s, files=None: seen.append((s, files)) or "csm")
    assert startup.load_tts(local) == "csm"
    assert seen == [(settings.tts.csm, local.csm)]  # loading finds nothing again: it opens what was fetched
