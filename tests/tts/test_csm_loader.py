"""Checkpoint layouts (checked against transformers' CSM), references, tokenizer, audio reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.models import ModelError
from app.tts.csm import loader
from app.tts.csm.generator import CsmGenerator, GenerationConfig, Prompt, text_rows
from app.tts.csm.loader import CheckpointMismatchError, ModelNotAvailableError
from app.tts.csm.model import CsmModel, CsmModelConfig

from .conftest import tiny_model

K, V, TEXT_VOCAB = 8, 64, 512  # a small codebook count: the parity test needs no Mimi


def _llama3_rope(max_positions: int) -> dict:
    """Sesame's RoPE scaling (factor 32, wavelengths 8192/2048) in transformers' terms, as the
    official conversion writes it: the same wavelengths over a shorter original context."""
    original = max_positions // 2
    return {
        "rope_type": "llama3",
        "factor": 32.0,
        "original_max_position_embeddings": original,
        "low_freq_factor": original / 8192,
        "high_freq_factor": original / 2048,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random transformers CsmForConditionalGeneration, saved as transformers saves it."""
    transformers = pytest.importorskip("transformers")
    decoder = transformers.CsmDepthDecoderConfig(
        num_codebooks=K, backbone_hidden_size=64, vocab_size=V, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=K * 2,
        rope_scaling=_llama3_rope(K * 2), initializer_range=0.2,
    )
    codec = transformers.MimiConfig(
        hidden_size=32, num_filters=4, codebook_dim=16, vector_quantization_hidden_dimension=16,
        num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        upsample_groups=32, num_quantizers=K, codebook_size=V,
    )
    config = transformers.CsmConfig(
        num_codebooks=K, vocab_size=V, text_vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_scaling=_llama3_rope(128), depth_decoder_config=decoder, codec_config=codec,
        initializer_range=0.2,  # wide logits: greedy choices are not decided by rounding
        bos_token_id=1, pad_token_id=2, audio_token_id=3, audio_eos_token_id=4,
    )
    torch.manual_seed(0)
    model = transformers.CsmForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("hf_csm")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def ours(reference) -> CsmModel:
    _, folder = reference
    paths = loader.resolve_checkpoint(str(folder))
    return loader.load_csm_model(paths, hints=loader.resolve_config_json(str(folder), paths[0]))


def _mixed_prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 text tokens then 3 audio frames, as 9-column rows (ours) and as ids/codes (transformers)."""
    generator = torch.Generator().manual_seed(5)
    text = torch.tensor([[1, 10, 20, 30, 5]])
    codes = torch.randint(1, V - 3, (1, 3, K), generator=generator)
    tokens = torch.zeros(1, 8, K + 1, dtype=torch.long)
    mask = torch.zeros(1, 8, K + 1, dtype=torch.bool)
    tokens[0, :5, -1], mask[0, :5, -1] = text[0], True
    tokens[0, 5:, :-1], mask[0, 5:, :-1] = codes[0], True
    return text, codes, tokens, mask


def test_transformers_layout_loads_with_the_published_sizes_read_off(ours: CsmModel) -> None:
    config = ours.config
    assert (config.audio_num_codebooks, config.audio_vocab_size, config.text_vocab_size) == (K, V, TEXT_VOCAB)
    assert (config.backbone.num_heads, config.backbone.num_kv_heads, config.decoder.embed_dim) == (4, 2, 32)
    assert config.max_seq_len == 128


def test_backbone_logits_match_transformers(reference, ours: CsmModel) -> None:
    hf, _ = reference
    text, codes, tokens, mask = _mixed_prompt()
    with torch.no_grad():
        embeds = torch.cat([hf.embed_text_tokens(text), hf.backbone_model.embed_tokens(codes)], dim=1)
        expected = hf(inputs_embeds=embeds).logits  # (1, 8, V)
        ours.reset_caches()
        hidden = ours.backbone_hidden(ours.embed_frames(tokens, mask), torch.arange(8)[None])
        got = ours.codebook0_logits(hidden)
    assert expected.abs().max() > 1.0  # logits with real spread, so the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_depth_decoder_logits_match_transformers(reference, ours: CsmModel) -> None:
    hf, _ = reference
    text, codes, tokens, mask = _mixed_prompt()
    frame = torch.randint(1, V - 3, (1, K), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        embeds = torch.cat([hf.embed_text_tokens(text), hf.backbone_model.embed_tokens(codes)], dim=1)
        last = hf(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -1]  # (1, 64)
        decoder_ids = torch.nn.functional.pad(frame[:, :-1], (1, 0))  # placeholder, c0 .. c_{K-2}
        expected = hf.depth_decoder(input_ids=decoder_ids, backbone_last_hidden_state=last).logits[0]
        # ours, through the KV-cached path generation uses: (state, c0) at [0, 1], then one code a step
        ours.reset_decoder_cache()
        step = torch.cat([last.unsqueeze(1), ours.embed_audio(0, frame[:, :1])], dim=1)
        got = [ours.decoder_logits(step, torch.tensor([[0, 1]]), codebook=1)]
        for cb in range(1, K - 1):
            code = ours.embed_audio(cb, frame[:, cb : cb + 1])
            got.append(ours.decoder_logits(code, torch.tensor([[cb + 1]]), codebook=cb + 1))
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_greedy_frames_match_transformers_generate(reference, ours: CsmModel) -> None:
    hf, _ = reference
    text = torch.tensor([[1, 40, 41, 42, 43, 5]])
    with torch.no_grad():
        expected = hf.generate(input_ids=text, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=12)[0]
    tokens, mask = text_rows(text[0].tolist(), K + 1)
    generator = CsmGenerator(ours, tokenizer=None, mimi=object(), seed=0)  # type: ignore[arg-type]
    ours.reset_caches()
    with torch.no_grad():
        chunks = generator.frame_chunks(Prompt(tokens, mask, max_frames=12, segments_used=0),
                                        GenerationConfig(topk=1), cancel=None)
        got = torch.cat(list(chunks))
    assert expected.shape[0] >= 6  # transformers stops early only on an EOS frame
    assert torch.equal(got[: expected.shape[0]], expected)
    assert len({tuple(f.tolist()) for f in got}) > 3  # real, varying frames, not a constant


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


def test_unpermute_is_the_inverse_of_the_transformers_rope_permutation() -> None:
    config = CsmModelConfig.tiny()
    heads, head_dim, dim = config.backbone.num_heads, config.backbone.head_dim, config.backbone.embed_dim
    original = torch.randn(heads * head_dim, dim)
    # transformers' conversion: rows (i, half) of each head become rows (half, i)
    permuted = original.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)
    restored = loader.unpermute_qk({"backbone.layers.0.attn.q_proj.weight": permuted}, config)
    assert torch.equal(restored["backbone.layers.0.attn.q_proj.weight"], original)
    assert not torch.equal(permuted, original)


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
    (tmp_path / "ckpt.safetensors").write_bytes(b"x")
    assert loader.resolve_checkpoint(str(tmp_path)) == [tmp_path / "ckpt.safetensors"]
    assert loader.resolve_file(str(tmp_path / "ckpt.safetensors"), ("a",), what="x") == tmp_path / "ckpt.safetensors"
    with pytest.raises(ModelNotAvailableError, match="no such file or folder"):
        loader.resolve_file(str(tmp_path / "nope" / "x.bin"), ("x.bin",), what="thing")
    with pytest.raises(ModelNotAvailableError, match="holds none of tokenizer.json"):
        loader.resolve_file(str(tmp_path), ("tokenizer.json",), what="thing")


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(loader.hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_model_offline_is_a_clear_error(empty_hub_cache: Path) -> None:
    with pytest.raises(ModelNotAvailableError) as error:
        loader.resolve_checkpoint("senstella/csm-expressiva-1b", offline=True)
    message = str(error.value)
    assert isinstance(error.value, ModelError)  # the server's one startup-error type
    assert "'senstella/csm-expressiva-1b'" in message and "ckpt.safetensors" in message
    assert "not on this machine" in message and "internet access" in message and "local copy" in message


def test_a_cached_hub_file_is_used_offline(empty_hub_cache: Path) -> None:
    snapshot = empty_hub_cache / "models--unsloth--Llama-3.2-1B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_text("{}")
    refs = empty_hub_cache / "models--unsloth--Llama-3.2-1B" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    found = loader.resolve_file("hf:unsloth/Llama-3.2-1B", ("tokenizer.json",), what="tokenizer", offline=True)
    assert found == snapshot / "tokenizer.json"


def test_tokenizer_wraps_each_turn_in_bos_and_eos(tokenizer_json: Path) -> None:
    tokenizer = loader.load_text_tokenizer(str(tokenizer_json))
    ids = tokenizer.encode_turn(4, "Hello there")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.tokenizer.decode(ids[1:-1]) == "[4]Hello there"
    assert tokenizer.bos_id not in ids[1:-1]  # no second BOS from a post-processor
    with pytest.raises(ValueError, match="<s>"):
        loader.load_text_tokenizer(str(tokenizer_json), bos_token="<s>")
