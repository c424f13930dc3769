"""Checkpoint layouts, references, tokenizer, audio reading (parity with transformers: test_csm_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.engines.models import ModelError
from app.engines.tts.csm import loader
from app.engines.tts.csm.generator import text_rows
from app.engines.tts.csm.loader import CheckpointMismatchError
from app.engines.tts.csm.model import CsmModel, CsmModelConfig

from .conftest import tiny_model


def _original_state(model: CsmModel) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _first_logits(model: CsmModel) -> torch.Tensor:
    tokens, mask = text_rows([3, 4, 5, 6], model.config.frame_width)
    with torch.no_grad():
        model.reset_caches()
        hidden = model.backbone_hidden(model.embed_frames(tokens[None], mask[None]), torch.arange(4)[None])
        return model.codebook0_logits(hidden[:, -1])


@pytest.mark.parametrize("form", ["model.safetensors", "ckpt.pt", "wrapped.pt", "compiled.safetensors"])
def test_original_layout_round_trips(tmp_path: Path, form: str) -> None:
    source = tiny_model(seed=3)
    state = _original_state(source)
    path = tmp_path / form
    if form == "wrapped.pt":
        torch.save({"model": state, "step": 1000}, path)  # a training script's checkpoint
    elif form.endswith(".pt"):
        torch.save(state, path)
    else:
        prefix = "_orig_mod." if form.startswith("compiled") else ""
        save_file({prefix + k: v for k, v in state.items()}, str(path))
    loaded = loader.load_csm_model([path], config=source.config)
    loaded_state = loaded.state_dict()
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], v) for k, v in state.items())  # bit for bit
    torch.testing.assert_close(_first_logits(loaded), _first_logits(source), atol=1e-6, rtol=1e-6)


def test_sesame_config_json_names_the_flavours(tmp_path: Path) -> None:
    with torch.device("meta"):
        state = CsmModel(CsmModelConfig.full()).state_dict()
    hints = {"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "audio_num_codebooks": 32}
    assert loader.infer_config(state, hints) == CsmModelConfig.full()
    assert loader.infer_config(state) == CsmModelConfig.full()  # and the sizes alone say the same


@pytest.mark.parametrize("stack", ["backbone", "decoder"])
@pytest.mark.parametrize("proj", ["q", "k"])
def test_unpermute_is_the_inverse_of_the_transformers_rope_permutation(stack: str, proj: str) -> None:
    config = CsmModelConfig.tiny()  # 4 query heads and 2 KV heads in each stack: each head is un-permuted alone
    shape = getattr(config, stack)
    heads = shape.num_heads if proj == "q" else shape.num_kv_heads
    original = torch.randn(heads * shape.head_dim, shape.embed_dim)
    # transformers' conversion: rows (i, half) of each head become rows (half, i)
    permuted = original.view(heads, shape.head_dim // 2, 2, -1).transpose(1, 2).reshape(original.shape)
    key = f"{stack}.layers.1.attn.{proj}_proj.weight"
    restored = loader.unpermute_qk({key: permuted}, config)
    assert torch.equal(restored[key], original)
    assert not torch.equal(permuted, original)


def test_untied_embeddings_named_by_config_json_alone_are_refused() -> None:
    table = torch.randn(6, 4)
    tied = {"backbone_model.embed_tokens.embed_audio_tokens.weight": table,
            "depth_decoder.model.embed_tokens.weight": table.clone()}
    loader.check_tied_embeddings(tied, {"tie_codebooks_embeddings": False})  # equal tables: one network
    one_table = {"depth_decoder.model.embed_tokens.weight": table}  # save_pretrained keeps one of two twins
    loader.check_tied_embeddings(one_table, {})
    with pytest.raises(CheckpointMismatchError, match="is not stored beside"):
        loader.check_tied_embeddings(one_table, {"tie_codebooks_embeddings": False})


def test_a_checkpoint_that_does_not_fit_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = _original_state(tiny_model())
    del state["backbone.layers.1.mlp.w2.weight"]
    state["backbone.layers.1.mlp.extra.weight"] = torch.zeros(2)
    state["projection.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as error:
        loader.load_csm_model([path], config=CsmModelConfig.tiny())
    message = str(error.value)
    assert "1 missing keys: backbone.layers.1.mlp.w2.weight" in message
    assert "1 unexpected keys: backbone.layers.1.mlp.extra.weight" in message
    assert "projection.weight (3, 3) != (32, 64)" in message


def test_something_that_is_not_csm_is_refused_with_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: encoder.weight") as error:
        loader.load_csm_model([path])
    assert "missing keys: audio_embeddings.weight" in str(error.value)


def test_local_references_resolve_to_files(tmp_path: Path) -> None:
    # The rules of every reference (files, folders, hub) are tested with app.engines.models (test_models.py).
    (tmp_path / "ckpt.safetensors").write_bytes(b"x")
    assert loader.resolve_checkpoint(str(tmp_path)) == [tmp_path / "ckpt.safetensors"]


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_model_offline_is_a_clear_error(empty_hub_cache: Path) -> None:
    with pytest.raises(ModelError) as error:
        loader.resolve_checkpoint("senstella/csm-expressiva-1b", offline=True)
    message = str(error.value)
    assert isinstance(error.value, ModelError)  # the server's one startup-error type
    assert "'senstella/csm-expressiva-1b'" in message and "ckpt.safetensors" in message
    assert "not on this machine" in message and "internet access" in message and "local copy" in message


def test_tokenizer_wraps_each_turn_in_bos_and_eos(tokenizer_json: Path) -> None:
    tokenizer = loader.load_text_tokenizer(str(tokenizer_json))
    ids = tokenizer.encode_turn(4, "Hello there")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.tokenizer.decode(ids[1:-1]) == "[4]Hello there"
    assert tokenizer.bos_id not in ids[1:-1]  # no second BOS from a post-processor
    with pytest.raises(ValueError, match="<s>"):
        loader.load_text_tokenizer(str(tokenizer_json), bos_token="<s>")
