"""Start-up on the loading thread: every phase to ready, one-line failures (a missing model, a
checkpoint or config.json that does not fit), and the cpu fallback when an auto-picked gpu model
cannot be had."""

from __future__ import annotations

import logging

import msgspec
import pytest
from safetensors.torch import save_file

from app import startup
from app.config import Settings, load_settings
from app.engines.loaded import Engines
from app.engines.loading import LoadStatus
from app.engines.models import ModelError, ModelMismatchError
from app.startup import BackgroundLoad, load_engines, one_line
from tests.support import RecordingStatus

# ---------------------------------------------------------------- loading phases


def test_a_real_cpu_load_goes_through_every_phase_to_ready(cpu_settings):
    status = RecordingStatus()
    handed_over: list[tuple[Settings, Engines]] = []
    loader = BackgroundLoad(cpu_settings, status, on_ready=lambda s, e: handed_over.append((s, e)))
    loader.start()
    try:
        assert status.wait(60).phase == "ready"
        (settings, engines), = handed_over
        assert settings is cpu_settings and engines.tts.name == "piper"
    finally:
        loader.close()
    messages = [(s.phase, s.message) for s in status.history]
    assert messages == [
        ("loading", "checking the model files"),
        ("loading", "loading the speech-to-text model"),
        ("loading", "loading the language model"),
        ("loading", "loading the voice"),
        ("warming", "warming up the speech-to-text model"),
        ("warming", "warming up the language model"),
        ("warming", "warming up the voice"),
        ("ready", "ready: preset cpu"),
    ]


def test_a_missing_model_fails_in_one_line(cpu_settings):
    broken = msgspec.structs.replace(
        cpu_settings, llm=msgspec.structs.replace(cpu_settings.llm, model="/nowhere/model.gguf")
    )
    status = LoadStatus()
    reasons: list[str] = []
    loader = BackgroundLoad(broken, status, on_ready=lambda s, e: None, on_failure=reasons.append)
    loader.start()
    state = status.wait(30)
    assert state.phase == "failed"
    assert state.message == "llm model '/nowhere/model.gguf': no such file or folder. Check the path you configured."
    assert reasons == [state.message]


# ---------------------------------------------------------------- a model that is there but does not fit


def _non_csm_checkpoint(tmp_path) -> ModelMismatchError:
    """What the CSM loader says of a checkpoint that is not CSM's."""
    import torch

    from app.engines.tts.csm import loader

    path = tmp_path / "model.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(loader.CheckpointMismatchError) as error:
        loader.load_csm_model([path])
    return error.value


def _unsupported_config(tmp_path) -> ModelMismatchError:
    """What the CSM loader says of a config.json that asks for arithmetic the network lacks."""
    from app.engines.tts.csm import config_json

    with pytest.raises(config_json.UnsupportedConfigError) as error:
        config_json.arithmetic({"rope_theta": -1})
    return error.value


@pytest.mark.parametrize("refusal", [_non_csm_checkpoint, _unsupported_config], ids=["checkpoint", "config"])
def test_a_refused_checkpoint_or_config_fails_in_one_line_without_a_traceback(
    monkeypatch, caplog, tmp_path, cpu_settings, refusal
):
    error = refusal(tmp_path)
    assert isinstance(error, ValueError) and one_line(error) == str(error)  # no type name before it

    def refused(settings, status=None):
        raise error

    monkeypatch.setattr(startup, "load_and_warm", refused)
    status = LoadStatus()
    reasons: list[str] = []
    loader = BackgroundLoad(cpu_settings, status, on_ready=lambda s, e: None, on_failure=reasons.append)
    with caplog.at_level(logging.ERROR, logger="app.startup"):
        loader.start()
        state = status.wait(30)
    assert state.phase == "failed" and state.message == str(error) and "\n" not in state.message
    assert reasons == [state.message]
    logged = [(r.getMessage(), r.exc_info) for r in caplog.records if r.name == "app.startup"]
    assert logged == [(str(error), None)]  # one line, no traceback


def test_a_refused_checkpoint_is_never_a_reason_to_fall_back(monkeypatch):
    gpu = load_settings("gpu", environ={})
    error = ModelMismatchError("ckpt.safetensors does not fit the CSM model")
    calls: list[str] = []

    def refused(settings, status=None):
        calls.append(settings.preset)
        raise error

    monkeypatch.setattr(startup, "load_and_warm", refused)
    with pytest.raises(ModelMismatchError):
        load_engines(gpu, fallback=True)
    assert calls == ["gpu"]  # the wrong setting is reported, not hidden behind the cpu preset


# ---------------------------------------------------------------- the cpu fallback


def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))


def test_auto_gpu_without_network_falls_back_to_cpu(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path)
    gpu = load_settings("gpu", {"port": 9123, "turns": {"end_silence_ms": 700}}, environ={})
    with pytest.raises(ModelError, match="asr model 'hf:"):
        load_engines(gpu, fallback=False)  # asked for gpu by name: say what is missing
    settings, engines = load_engines(gpu, fallback=True)  # picked automatically: run offline
    try:
        assert settings.preset == "cpu" and engines.tts.name == "piper"
        assert settings.asr.device == "cpu" and settings.llm.n_gpu_layers == 0
        assert settings.port == 9123 and settings.turns.end_silence_ms == 700  # the rest is kept
    finally:
        engines.close()
