"""The CSM network on its own: sizes, checkpoint names, frame embedding, KV caches, devices."""

from __future__ import annotations

import pytest
import torch

from app.engines.tts.csm.generator import text_rows
from app.engines.tts.csm.model import LLAMA_1B, LLAMA_100M, CsmModel, CsmModelConfig, LlamaShape

from .conftest import tiny_model


def test_full_config_is_the_published_csm_1b() -> None:
    config = CsmModelConfig.full()
    assert (config.backbone.num_layers, config.backbone.embed_dim, config.backbone.num_heads) == (16, 2048, 32)
    assert (config.decoder.num_layers, config.decoder.embed_dim, config.decoder.num_kv_heads) == (4, 1024, 2)
    assert (config.text_vocab_size, config.audio_vocab_size, config.audio_num_codebooks) == (128_256, 2051, 32)
    assert (config.rope_base, config.rope_scale_factor, config.norm_eps) == (500_000, 32, 1e-5)
    assert config.frame_width == 33


def test_config_refuses_heads_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="divide"):
        CsmModelConfig(backbone=LlamaShape(num_layers=1, num_heads=3, num_kv_heads=1, embed_dim=64, intermediate_dim=8))


def test_full_model_on_meta_has_original_checkpoint_names_and_shapes() -> None:
    with torch.device("meta"):
        model = CsmModel(CsmModelConfig.full())
    state = model.state_dict()
    assert state["text_embeddings.weight"].shape == (128_256, 2048)
    assert state["audio_embeddings.weight"].shape == (2051 * 32, 2048)
    assert state["codebook0_head.weight"].shape == (2051, 2048)
    assert state["projection.weight"].shape == (1024, 2048)
    assert state["audio_head"].shape == (31, 1024, 2051)
    assert state["backbone.layers.15.attn.k_proj.weight"].shape == (8 * 64, 2048)
    assert state["decoder.layers.3.mlp.w1.weight"].shape == (8192, 1024)
    assert "decoder.norm.scale" in state and "backbone.layers.16.mlp.w1.weight" not in state
    params = sum(v.numel() for v in state.values())
    assert 1.4e9 < params < 1.7e9  # the "1B" backbone + 100M decoder + embeddings


def test_embed_frames_sums_only_the_masked_in_columns() -> None:
    model = tiny_model(audio_num_codebooks=4)
    k, vocab = 4, model.config.audio_vocab_size
    tokens = torch.tensor([[[0, 0, 0, 0, 7], [3, 5, 1, 2, 9]]])  # a text row, then an audio row
    mask = torch.tensor([[[False] * 4 + [True], [True] * 4 + [False]]])
    embeds = model.embed_frames(tokens, mask)
    assert embeds.shape == (1, 2, model.config.backbone.embed_dim)
    torch.testing.assert_close(embeds[0, 0], model.text_embeddings.weight[7])
    rows = torch.tensor([3, 5, 1, 2]) + torch.arange(k) * vocab
    torch.testing.assert_close(embeds[0, 1], model.audio_embeddings.weight[rows].sum(0))


def test_step_by_step_with_the_kv_cache_equals_one_full_pass() -> None:
    model = tiny_model()
    tokens, mask = text_rows(list(range(2, 12)), model.config.frame_width)
    tokens, mask = tokens[None], mask[None]
    with torch.no_grad():
        model.reset_caches()
        full = model.backbone_hidden(model.embed_frames(tokens, mask), torch.arange(10)[None])
        model.reset_caches()
        head = model.backbone_hidden(model.embed_frames(tokens[:, :6], mask[:, :6]), torch.arange(6)[None])
        steps = [model.backbone_hidden(model.embed_frames(tokens[:, i : i + 1], mask[:, i : i + 1]),
                                       torch.tensor([[i]])) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat([head, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_reset_makes_a_second_utterance_independent_of_the_first() -> None:
    model = tiny_model()
    tokens, mask = text_rows([5, 6, 7], model.config.frame_width)
    with torch.no_grad():
        model.reset_caches()
        first = model.backbone_hidden(model.embed_frames(tokens[None], mask[None]), torch.arange(3)[None])
        model.backbone_hidden(model.embed_frames(tokens[None, :1], mask[None, :1]), torch.tensor([[3]]))
        model.reset_caches()
        again = model.backbone_hidden(model.embed_frames(tokens[None], mask[None]), torch.arange(3)[None])
    torch.testing.assert_close(again, first)
    cache = model.backbone.layers[0].attn.kv_cache
    assert int(cache.cache_pos[0]) == 3  # the fill level follows the writes, from zero after reset


def test_decoder_logits_have_one_head_per_codebook() -> None:
    model = tiny_model()
    hidden = torch.randn(1, 2, model.config.backbone.embed_dim)
    with torch.no_grad():
        model.reset_decoder_cache()
        first = model.decoder_logits(hidden, torch.tensor([[0, 1]]), codebook=1)
        model.reset_decoder_cache()
        other_head = model.decoder_logits(hidden, torch.tensor([[0, 1]]), codebook=5)
    assert first.shape == (1, model.config.audio_vocab_size)
    assert not torch.allclose(first, other_head)


def test_flavours_match_the_reference_sizes() -> None:
    assert (LLAMA_1B.head_dim, LLAMA_100M.head_dim) == (64, 128)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 path)")
def test_runs_in_bf16_on_the_gpu() -> None:
    torch.manual_seed(0)
    model = CsmModel(CsmModelConfig.tiny()).prepare(device="cuda", dtype=torch.bfloat16)
    tokens, mask = text_rows([1, 2, 3], model.config.frame_width)
    with torch.no_grad():
        model.reset_caches()
        hidden = model.backbone_hidden(model.embed_frames(tokens[None].cuda(), mask[None].cuda()),
                                       torch.arange(3, device="cuda")[None])
    assert hidden.dtype == torch.bfloat16 and hidden.is_cuda and torch.isfinite(hidden).all()
    rope = model.backbone.layers[0].attn.pos_embeddings
    assert rope.cache.dtype == torch.float32  # RoPE tables stay exact in a bf16 model
