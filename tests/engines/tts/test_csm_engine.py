"""The CSM TtsEngine: settings, int16 streaming, voice memory, voice prompt, loading from files."""

from __future__ import annotations

import subprocess
import sys
import threading
import wave
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.engines.models import ModelError
from app.engines.tts.csm.engine import CsmEngine, CsmVoice, load_csm_engine, pick_device
from app.engines.tts.csm.generator import Segment
from app.engines.tts.csm.settings import CsmSettings

from .conftest import tiny_model, varying_frame

EOS_FRAME = [0] * 32
FAST = {"first_chunk_frames": 2, "chunk_frames": 4, "max_audio_seconds": 1.2}  # at most 15 frames a reply


def _engine(make_generator, voice_prompt: Segment | None = None, **settings) -> CsmEngine:
    return CsmEngine(make_generator(), CsmSettings(**{**FAST, **settings}), voice_prompt=voice_prompt)


def _eos_after(n: int):
    return lambda i: varying_frame(i) if i < n else EOS_FRAME


# ---------------------------------------------------------------- settings


def test_settings_defaults_are_the_expressiva_voice() -> None:
    settings = CsmSettings()
    assert settings.model == "senstella/csm-expressiva-1b" and settings.speaker_id() == 4
    assert (settings.temperature, settings.topk, settings.device) == (0.9, 50, "auto")
    assert settings.tokenizer == "unsloth/Llama-3.2-1B" and settings.mimi == "kyutai/moshiko-pytorch-bf16"
    assert CsmSettings(model="unsloth/csm-1b").speaker_id() == 0
    assert CsmSettings(speaker=2).speaker_id() == 2


def test_settings_come_from_strings_like_the_environment_gives() -> None:
    settings = msgspec.convert({"speaker": "1", "temperature": "0.7", "offline": "true"}, CsmSettings, strict=False)
    assert (settings.speaker, settings.temperature, settings.offline) == (1, 0.7, True)


@pytest.mark.parametrize(
    "bad",
    [{"first_chunk_frames": 5}, {"topk": 0}, {"voice_prompt_wav": "a.wav"}, {"context_frames": -1}],
)
def test_settings_refuse_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        CsmSettings(**bad)


def test_importing_the_engine_does_not_import_torch() -> None:
    code = ("import sys, app.engines.tts.csm.engine, app.engines.tts.csm.settings as c; c.CsmSettings(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pick_device_follows_the_machine() -> None:
    device, dtype = pick_device(CsmSettings())
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float32)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
    assert pick_device(CsmSettings(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)


# ---------------------------------------------------------------- synthesis


def test_engine_streams_int16_mono_chunks(make_generator) -> None:
    engine = _engine(make_generator)
    assert engine.name == "csm" and engine.sample_rate == 24_000
    text = "Hello there, how are you?"
    chunks = list(engine.synthesize(text, voice=engine.new_voice()))
    assert chunks and all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    assert len(chunks[0]) == 2 * 1920  # the first chunk: two frames, 160 ms
    assert sum(len(c) for c in chunks) == engine.last_utterance.codes.shape[0] * 1920
    # The same seed through the generator alone gives the float PCM: the int16 stream is that, at full scale.
    twin = make_generator().utterance(text, speaker=engine.speaker, config=engine.config)
    pcm = np.clip(np.concatenate(list(twin)), -1.0, 1.0)
    ints = np.concatenate(chunks).astype(np.float64)
    assert ints.shape == pcm.shape and np.abs(pcm).max() > 1e-3
    assert np.abs(ints / 32767 - pcm).max() <= 1 / 32767  # int16 rounding, nothing more


@pytest.mark.parametrize("text", ["", "   ", "...", " — ! "])
def test_nothing_to_say_yields_nothing(make_generator, text: str) -> None:
    engine = _engine(make_generator)
    engine.generator.generate_frame = lambda *a: pytest.fail("no frame for an empty phrase")
    assert list(engine.synthesize(text)) == []


def test_voice_remembers_clean_utterances_as_context(make_generator, scripted) -> None:
    engine = _engine(make_generator)
    engine.generator.generate_frame = scripted(_eos_after(5))
    voice = engine.new_voice()
    list(engine.synthesize("  First   phrase. ", voice=voice))
    assert [(s.text, s.codes.shape, s.speaker) for s in voice.segments] == [("First phrase.", (5, 32), 4)]
    engine.generator.generate_frame = scripted(_eos_after(3))
    list(engine.synthesize("Second phrase.", voice=voice))
    assert engine.last_utterance.prompt.segments_used == 1  # the first phrase was the context
    assert [s.text for s in voice.segments] == ["First phrase.", "Second phrase."]


def _prompt_text(engine: CsmEngine) -> str:
    """The text the last utterance's prompt gave the model, special tokens left out."""
    prompt = engine.last_utterance.prompt
    ids = prompt.tokens[:, -1][prompt.mask[:, -1]].tolist()
    return engine.generator.tokenizer.tokenizer.decode(ids)


def test_a_voice_can_pick_another_speaker(make_generator, scripted) -> None:
    engine = _engine(make_generator)
    engine.generator.generate_frame = scripted(_eos_after(4))
    voice = engine.new_voice(speaker=2)
    list(engine.synthesize("Hello.", voice=voice))
    assert [s.speaker for s in voice.segments] == [2] and _prompt_text(engine) == "[2]Hello."
    engine.generator.generate_frame = scripted(_eos_after(4))
    other = engine.new_voice()  # another conversation still speaks as the default speaker
    list(engine.synthesize("Hello.", voice=other))
    assert [s.speaker for s in other.segments] == [4] and _prompt_text(engine) == "[4]Hello."


def test_cancelled_or_runaway_utterances_are_not_remembered(make_generator, scripted) -> None:
    engine = _engine(make_generator)
    voice = engine.new_voice()
    engine.generator.generate_frame = scripted(varying_frame)  # never EOS: runs to the length cap
    assert list(engine.synthesize("Hello.", voice=voice))
    assert engine.last_utterance.stop_reason == "max_length" and voice.segments == []
    cancel = threading.Event()
    stream = engine.synthesize("Hello again.", voice=voice, cancel=cancel)
    next(stream)
    cancel.set()
    assert list(stream) == [] and engine.last_utterance.stop_reason == "cancelled"
    assert voice.segments == []


def test_voice_budget_keeps_the_most_recent_frames() -> None:
    voice = CsmVoice(budget_frames=70)
    for name in ("a", "b", "c"):
        voice.remember(Segment(speaker=4, text=name, codes=torch.ones(30, 32, dtype=torch.long)))
    assert [s.text for s in voice.segments] == ["b", "c"]


def test_voice_prompt_is_always_in_the_context(make_generator, scripted) -> None:
    prompt = Segment(speaker=4, text="This is how I sound.", codes=torch.ones(10, 32, dtype=torch.long))
    engine = _engine(make_generator, voice_prompt=prompt)
    engine.generator.generate_frame = scripted(_eos_after(2))
    list(engine.synthesize("Hi.", voice=engine.new_voice()))
    assert engine.last_utterance.prompt.segments_used == 1
    list(engine.synthesize("Hi.", voice=None))  # also without a conversation
    assert engine.last_utterance.prompt.segments_used == 1


def test_warm_up_is_about_a_second_of_speech(make_generator) -> None:
    engine = _engine(make_generator, max_audio_seconds=20.0)
    engine.warm_up()
    assert 1 <= engine.last_utterance.frames_generated <= 12


# ---------------------------------------------------------------- loading from files


@pytest.fixture(scope="module")
def csm_files(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: Path, mimi) -> dict[str, str]:
    """A tiny original-layout checkpoint, a tokenizer.json, random Mimi weights and a 1 s voice WAV."""
    folder = tmp_path_factory.mktemp("csm_files")
    model = tiny_model(seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "ckpt.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in mimi.state_dict().items()}, str(folder / "mimi.safetensors"))
    wav = folder / "voice.wav"
    tone = (0.3 * np.sin(2 * np.pi * 180 * np.arange(16_000) / 16_000) * 32767).astype(np.int16)
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes(tone.tobytes())
    return {
        "model": str(folder),
        "tokenizer": str(tokenizer_json),
        "mimi": str(folder / "mimi.safetensors"),
        "voice_prompt_wav": str(wav),
        "config": msgspec.to_builtins(model.config),
    }


def test_load_csm_engine_from_local_files_with_a_voice_prompt(csm_files: dict) -> None:
    settings = CsmSettings(
        model=csm_files["model"], tokenizer=csm_files["tokenizer"], mimi=csm_files["mimi"],
        voice_prompt_wav=csm_files["voice_prompt_wav"], voice_prompt_text="Hello, this is my voice.",
        model_config=csm_files["config"], device="cpu", seed=0, **FAST,
    )
    engine = load_csm_engine(settings)
    assert engine.voice_prompt is not None and engine.voice_prompt.codes.shape == (13, 32)  # 1 s
    assert engine.generator.model.config.backbone.embed_dim == 64
    chunks = list(engine.synthesize("Nice to meet you.", voice=engine.new_voice()))
    assert chunks and engine.last_utterance.prompt.segments_used == 1


def test_benchmarks_random_folder_loads_through_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The gpu preset's runbook without the hub: benchmarks/random_csm.py writes what the env settings name.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from random_csm import write_folder

    write_folder(tmp_path, "tiny", seed=0)
    settings = CsmSettings(model=str(tmp_path), tokenizer=str(tmp_path / "tokenizer.json"),
                           mimi=str(tmp_path / "mimi.safetensors"), device="cpu", offline=True, **FAST)
    engine = load_csm_engine(settings)
    assert engine.generator.model.config.backbone.embed_dim == 64  # read off the checkpoint and config.json
    assert list(engine.synthesize("Hello there."))


def test_load_csm_engine_offline_without_the_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as error:
        load_csm_engine(CsmSettings(offline=True, device="cpu"))
    message = str(error.value)
    assert message.startswith("tts model 'senstella/csm-expressiva-1b'")
    assert "offline" in message and "--preset cpu" in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 end to end)")
def test_load_csm_engine_on_the_gpu_in_bf16(csm_files: dict) -> None:
    settings = CsmSettings(model=csm_files["model"], tokenizer=csm_files["tokenizer"], mimi=csm_files["mimi"],
                           model_config=csm_files["config"], seed=0, **FAST)
    engine = load_csm_engine(settings)
    assert engine.generator.device.type == "cuda"
    assert engine.generator.model.text_embeddings.weight.dtype == torch.bfloat16
    chunks = list(engine.synthesize("Hello from the GPU."))
    assert chunks and all(c.dtype == np.int16 for c in chunks)
