"""CSM against transformers' CsmForConditionalGeneration with the same random weights.

Two references, each with CSM-1B's structure where a loading bug would hide: 32 codebooks of 2051
codes, decoder heads twice as wide as the backbone's, grouped-query attention, Llama-3 RoPE scaling,
and every weight random, norm scales included (a norm left at 1.0 cannot tell a swapped norm). Only
the widths, depths and text vocabulary are small, to run on a CPU.
  - published: 64-wide backbone heads, one KV head, and the RoPE and norm settings of the published
    config.json, which are also CsmModel's defaults;
  - grouped: two KV heads of two query heads each (a k_proj un-permute right only for one head, or
    query heads grouped in the wrong order, shows), and rope_theta, rms_norm_eps and the RoPE factor
    all off CSM-1B's values (a setting the loader or the network drops shows).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers
from safetensors.torch import save_file

from app.engines.tts.csm import loader
from app.engines.tts.csm.generator import (
    CsmGenerator,
    GenerationConfig,
    Prompt,
    Segment,
    build_prompt,
    text_rows,
)
from app.engines.tts.csm.loader import CheckpointMismatchError
from app.engines.tts.csm.model import CsmModel

K, V, TEXT_VOCAB = 32, 2051, 512
AUDIO_TOKEN, AUDIO_EOS_TOKEN = TEXT_VOCAB - 2, TEXT_VOCAB - 1  # placeholders no test text uses


class Spec(NamedTuple):
    """The attention shapes and arithmetic of one reference."""

    heads: int
    kv_heads: int
    head_dim: int  # the backbone's; the decoder's heads are twice as wide, as in CSM-1B
    rope_theta: float
    norm_eps: float
    rope_factor: float

    @property
    def widths(self) -> tuple[int, int]:
        """(backbone, decoder) hidden sizes."""
        return self.heads * self.head_dim, self.heads * self.head_dim * 2


PUBLISHED = Spec(heads=2, kv_heads=1, head_dim=64, rope_theta=500_000.0, norm_eps=1e-5, rope_factor=32.0)
# Each setting far enough from CSM-1B's to show: left at CSM-1B's value, the backbone logits move by
# 0.9 (theta), 4e-2 (eps) and 3e-3 (factor), where the two implementations differ by 2e-6 and 1e-4 is allowed.
GROUPED = Spec(heads=4, kv_heads=2, head_dim=32, rope_theta=10_000.0, norm_eps=1e-2, rope_factor=2.0)


def _rope(factor: float, original: int, low: float, high: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "original_max_position_embeddings": original,
            "low_freq_factor": low, "high_freq_factor": high}


# sesame/csm-1b's config.json as transformers' conversion wrote it: Sesame's Llama-3 schedule (wavelengths
# 8192 and 2048) restated over each stack's own context (2048 and 33 positions).
def _backbone_rope(factor: float) -> dict:
    return _rope(factor, 1024, 0.125, 0.5)


def _decoder_rope(factor: float) -> dict:
    return _rope(factor, 16, 0.001953125, 0.0078125)


def _reference_config(spec: Spec, **overrides) -> transformers.CsmConfig:
    width, decoder_width = spec.widths
    shared = {"num_hidden_layers": 2, "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
              "rope_theta": spec.rope_theta, "rms_norm_eps": spec.norm_eps}
    decoder = transformers.CsmDepthDecoderConfig(
        num_codebooks=K, backbone_hidden_size=width, vocab_size=V, hidden_size=decoder_width,
        intermediate_size=2 * decoder_width, head_dim=2 * spec.head_dim, max_position_embeddings=K + 1,
        rope_scaling=_decoder_rope(spec.rope_factor), **shared,
    )
    codec = transformers.MimiConfig(  # a tiny Mimi: it only turns the voice context into codes
        hidden_size=32, num_filters=4, codebook_dim=16, vector_quantization_hidden_dimension=16,
        num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        upsample_groups=32, num_quantizers=K, codebook_size=2048,
    )
    return transformers.CsmConfig(
        num_codebooks=K, vocab_size=V, text_vocab_size=TEXT_VOCAB, hidden_size=width, intermediate_size=2 * width,
        head_dim=spec.head_dim, max_position_embeddings=2048, rope_scaling=_backbone_rope(spec.rope_factor),
        depth_decoder_config=decoder, codec_config=codec, bos_token_id=0, pad_token_id=TEXT_VOCAB - 3,
        audio_token_id=AUDIO_TOKEN, audio_eos_token_id=AUDIO_EOS_TOKEN, **shared, **overrides,
    )


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every CSM tensor random at a scale that keeps activations near 1 (the codec keeps its init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith("codec_model."):
                continue
            if tensor.ndim == 1:  # RMSNorm scales (CSM has no biases): far from 1 and from each other
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif "tokens" in name:  # embedding tables
                tensor.normal_(0.0, 1.0, generator=generator)
            else:  # (out, in) projections and the (K-1, in, V) codebook heads
                tensor.normal_(0.0, 1.0 / math.sqrt(tensor.shape[1]), generator=generator)


def _saved_reference(spec: Spec, folder: Path, **overrides) -> transformers.CsmForConditionalGeneration:
    """A random transformers model of `spec`, saved to `folder` (weights + config.json) as its own."""
    torch.manual_seed(0)
    model = transformers.CsmForConditionalGeneration(_reference_config(spec, **overrides)).eval()
    _randomise(model, seed=0)
    model.save_pretrained(folder)
    return model


def _load_folder(folder: Path) -> CsmModel:
    paths = loader.resolve_checkpoint(str(folder))
    return loader.load_csm_model(paths, hints=loader.resolve_config_json(str(folder), paths[0]))


class Reference(NamedTuple):
    spec: Spec
    hf: transformers.CsmForConditionalGeneration
    ours: CsmModel  # loaded from the folder transformers saved itself to


def _reference(spec: Spec, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    folder = tmp_path_factory.mktemp("hf_csm")
    hf = _saved_reference(spec, folder)
    return Reference(spec, hf, _load_folder(folder))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return _reference(PUBLISHED, tmp_path_factory)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return _reference(GROUPED, tmp_path_factory)


@pytest.fixture(scope="module", params=["published", "grouped"])
def reference(request: pytest.FixtureRequest) -> Reference:
    """Each reference in turn."""
    return request.getfixturevalue(request.param)


def _mixed_prompt(text_len: int = 12, frames: int = 28):
    """Text tokens then audio frames, as (1, S, K+1) rows (ours) and as ids and codes (transformers).

    40 positions: far enough for RoPE's slow frequencies, which the scaling changes, to turn.
    """
    generator = torch.Generator().manual_seed(5)
    text = torch.randint(2, TEXT_VOCAB - 3, (1, text_len), generator=generator)
    codes = torch.randint(1, 2048, (1, frames, K), generator=generator)
    tokens = torch.zeros(1, text_len + frames, K + 1, dtype=torch.long)
    mask = torch.zeros(1, text_len + frames, K + 1, dtype=torch.bool)
    tokens[0, :text_len, -1], mask[0, :text_len, -1] = text[0], True
    tokens[0, text_len:, :-1], mask[0, text_len:, :-1] = codes[0], True
    return text, codes, tokens, mask


def _greedy(model: CsmModel, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames, K) greedy codes through the generator's own frame loop (no Mimi needed), and the
    (frames, V) codebook-0 logits each frame step saw."""
    generator = CsmGenerator(model, tokenizer=None, mimi=object(), seed=0)  # type: ignore[arg-type]
    seen: list[torch.Tensor] = []
    head = model.codebook0_logits

    def recording_head(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(head(hidden))
        return seen[-1]

    model.codebook0_logits = recording_head  # type: ignore[method-assign]
    model.reset_caches()
    try:
        with torch.no_grad():
            frames = torch.cat(list(generator.frame_chunks(prompt, GenerationConfig(topk=1), cancel=None)))
    finally:
        del model.codebook0_logits  # the class's method again
    return frames, torch.cat(seen)


def _generate(hf, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy (frames, K) codes and (frames, V) codebook-0 logits."""
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, depth_decoder_do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    return out.sequences[0], torch.cat(out.logits)


def _assert_same_generation(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]):
    (frames, logits), (expected_frames, expected_logits) = got, expected
    n = expected_frames.shape[0]
    assert n >= 5  # transformers stops early only on an EOS frame
    assert torch.equal(frames[:n], expected_frames)
    torch.testing.assert_close(logits[:n], expected_logits, atol=1e-4, rtol=1e-4)


def test_transformers_layout_loads_with_the_sizes_and_arithmetic_read_off(reference: Reference) -> None:
    config, spec = reference.ours.config, reference.spec
    assert (config.audio_num_codebooks, config.audio_vocab_size, config.text_vocab_size) == (K, V, TEXT_VOCAB)
    assert (config.backbone.num_heads, config.backbone.num_kv_heads, config.backbone.head_dim) == spec[:3]
    decoder = (config.decoder.num_heads, config.decoder.num_kv_heads, config.decoder.head_dim)
    assert decoder == (spec.heads, spec.kv_heads, 2 * spec.head_dim)
    assert (config.rope_base, config.norm_eps, config.rope_scale_factor) == spec[3:]
    assert config.max_seq_len == 2048
    layer = reference.ours.decoder.layers[1]  # every weight random: a swapped or dropped norm would show
    assert not torch.allclose(layer.sa_norm.scale, layer.mlp_norm.scale)
    assert not torch.allclose(layer.sa_norm.scale, torch.ones_like(layer.sa_norm.scale), atol=0.1)


@torch.no_grad()
def _codebook0_logits(hf, model: CsmModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, S, V) codebook-0 logits of the mixed prompt: (transformers', the model's)."""
    text, codes, tokens, mask = _mixed_prompt()
    embeds = torch.cat([hf.embed_text_tokens(text), hf.backbone_model.embed_tokens(codes)], dim=1)
    expected = hf(inputs_embeds=embeds).logits
    model.reset_caches()
    hidden = model.backbone_hidden(model.embed_frames(tokens, mask), torch.arange(tokens.shape[1])[None])
    return expected, model.codebook0_logits(hidden)


def test_backbone_logits_match_transformers(reference: Reference) -> None:
    expected, got = _codebook0_logits(reference.hf, reference.ours)
    assert expected.abs().max() > 1.0  # logits with real spread, so the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _sesame_hints(spec: Spec) -> dict:
    """A config.json for an original-layout checkpoint: the head counts, and the arithmetic only where
    it is not CSM-1B's (Sesame's own config.json names no RoPE or norm settings)."""
    section: dict = {"num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads}
    if spec != PUBLISHED:
        section |= {"rope_theta": spec.rope_theta, "rms_norm_eps": spec.norm_eps,
                    "rope_scaling": _backbone_rope(spec.rope_factor)}
    return {**section, "depth_decoder_config": section}


def test_original_layout_matches_transformers(reference: Reference, tmp_path: Path) -> None:
    """Sesame's key names: for the published reference with no RoPE or norm settings in config.json,
    so the network's defaults must be CSM-1B's published ones."""
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in reference.ours.state_dict().items()}, str(path))
    original = loader.load_csm_model([path], hints=_sesame_hints(reference.spec))
    expected, got = _codebook0_logits(reference.hf, original)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_depth_decoder_logits_match_transformers(reference: Reference) -> None:
    hf, ours = reference.hf, reference.ours
    text, codes, _, _ = _mixed_prompt()
    frame = torch.randint(1, 2048, (1, K), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        embeds = torch.cat([hf.embed_text_tokens(text), hf.backbone_model.embed_tokens(codes)], dim=1)
        last = hf(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -1]  # (1, D)
        decoder_ids = torch.nn.functional.pad(frame[:, :-1], (1, 0))  # placeholder, c0 .. c_{K-2}
        expected = hf.depth_decoder(input_ids=decoder_ids, backbone_last_hidden_state=last).logits[0]  # (K-1, V)
        # ours, through the KV-cached path generation uses: (state, c0) at [0, 1], then one code a step
        ours.reset_decoder_cache()
        step = torch.cat([last.unsqueeze(1), ours.embed_audio(0, frame[:, :1])], dim=1)
        got = [ours.decoder_logits(step, torch.tensor([[0, 1]]), codebook=1)]
        for cb in range(1, K - 1):
            code = ours.embed_audio(cb, frame[:, cb : cb + 1])
            got.append(ours.decoder_logits(code, torch.tensor([[cb + 1]]), codebook=cb + 1))
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-4, rtol=1e-4)


def test_greedy_frames_match_transformers_generate(reference: Reference) -> None:
    hf, ours = reference.hf, reference.ours
    text = torch.tensor([[0, 40, 41, 42, 43, 1]])
    expected = _generate(hf, input_ids=text, attention_mask=torch.ones_like(text), max_new_tokens=12)
    tokens, mask = text_rows(text[0].tolist(), K + 1)
    got = _greedy(ours, Prompt(tokens, mask, max_frames=12, segments_used=0))
    _assert_same_generation(got, expected)
    assert len({tuple(f.tolist()) for f in got[0]}) > 3  # real, varying frames, not a constant


def _voice(frames: int) -> torch.Tensor:
    """A deterministic stand-in recording, (frames * 1920,) samples at 24 kHz."""
    t = torch.arange(frames * 1920) / 24_000
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
    return 0.3 * torch.sin(2 * math.pi * 180 * t) * torch.sin(2 * math.pi * 3 * t) + 0.05 * noise


def test_greedy_frames_after_a_voice_context_match_transformers(published: Reference, text_tokenizer) -> None:
    """A past turn's text and audio, then the new text: our prompt rows against transformers' own
    audio merge (its codec encodes the recording; placeholders and the audio-EOS token mark it).
    The prompt rows do not depend on the attention shapes: the published reference alone."""
    hf, ours = published.hf, published.ours
    wave = _voice(frames=12)[None, None]  # (1, 1, samples)
    with torch.no_grad():
        codes = hf.codec_model.encode(wave).audio_codes[0].T  # (F, K)
    context = Segment(speaker=1, text="Hello there, how are you today?", codes=codes)
    new_text = "I am a small voice assistant."
    prompt = build_prompt(text_tokenizer, text=new_text, speaker=1, context=[context], pinned=1,
                          max_frames=10, capacity=ours.config.max_seq_len, width=K + 1)
    ids = (text_tokenizer.encode_turn(1, context.text) + [AUDIO_TOKEN] * codes.shape[0] + [AUDIO_EOS_TOKEN]
           + text_tokenizer.encode_turn(1, new_text))
    assert prompt.segments_used == 1 and prompt.tokens.shape[0] == len(ids)
    input_ids = torch.tensor([ids])
    expected = _generate(hf, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), input_values=wave,
                         input_values_cutoffs=torch.tensor([[wave.shape[-1]]]), max_new_tokens=10)
    got = _greedy(ours, prompt)
    _assert_same_generation(got, expected)
    text_only = build_prompt(text_tokenizer, text=new_text, speaker=1, context=[], pinned=0, max_frames=10,
                             capacity=ours.config.max_seq_len, width=K + 1)
    assert not torch.equal(_greedy(ours, text_only)[0], got[0])  # the context did steer the voice


def test_untied_decoder_embeddings_are_refused(tmp_path: Path) -> None:
    """A depth decoder with codebook embeddings of its own: CsmModel has one table for both stacks,
    so loading it would silently run the backbone's table in the decoder."""
    hf = _saved_reference(PUBLISHED, tmp_path, tie_codebooks_embeddings=False)
    decoder_table = hf.depth_decoder.model.embed_tokens.weight
    assert not torch.equal(decoder_table, hf.backbone_model.embed_tokens.embed_audio_tokens.weight)
    with pytest.raises(CheckpointMismatchError, match="untied codebook embeddings") as error:
        _load_folder(tmp_path)
    message = str(error.value)
    assert "depth_decoder.model.embed_tokens.weight differs from" in message
    assert "backbone_model.embed_tokens.embed_audio_tokens.weight" in message
