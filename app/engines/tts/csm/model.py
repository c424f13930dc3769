"""The CSM-1B network: a Llama backbone that reads frames and a small Llama decoder that fills them.

A frame is one row of `frame_width` = num_codebooks + 1 token columns: the audio codes of one
80 ms Mimi frame in columns 0..K-1 and a text token in column K. A boolean mask of the same shape
says which columns are real: text rows use only column K, audio rows only columns 0..K-1.

Per audio frame the model runs (shapes for batch B, backbone width D, decoder width d, K codebooks):

    frames (B, S, K+1) --embed_frames--> (B, S, D) --backbone--> h (B, S, D)
    h[:, -1] --codebook0_head--> logits of codebook 0 (B, V)
    [h[:, -1], embed(c0)] --projection--> (B, 2, d) --decoder--> audio_head[0] --> codebook 1
    embed(c_i) --projection--> (B, 1, d) --decoder--> audio_head[i] --> codebook i+1  (i = 1..K-2)

The attribute names match Sesame's original checkpoint keys, so that layout loads as it is.
Sampling and the frame loop live in generator.py; this module is only the network.
"""

from __future__ import annotations

import msgspec
import torch
from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import KVCache, TransformerDecoder


class LlamaShape(msgspec.Struct, frozen=True, kw_only=True):
    """Sizes of one Llama stack (torchtune's llama3_2 builder takes exactly these)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


# The two flavours CSM-1B is made of (Sesame's names for them in its config.json).
LLAMA_1B = LlamaShape(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192)
LLAMA_100M = LlamaShape(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192)
FLAVORS = {"llama-1B": LLAMA_1B, "llama-100M": LLAMA_100M}


class CsmModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Every size of the network; the defaults are the published CSM-1B."""

    backbone: LlamaShape = LLAMA_1B
    decoder: LlamaShape = LLAMA_100M
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # 2048 Mimi codes + specials; code 0 in every codebook is EOS
    audio_num_codebooks: int = 32
    max_seq_len: int = 2048  # backbone positions: prompt + generated frames must fit here
    rope_base: float = 500_000.0
    rope_scale_factor: float = 32.0  # Llama-3 RoPE: wavelengths over 8192 slowed this much (1.0: plain RoPE)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name, shape in (("backbone", self.backbone), ("decoder", self.decoder)):
            if shape.embed_dim % shape.num_heads or shape.num_heads % shape.num_kv_heads:
                raise ValueError(f"{name}: embed_dim/num_heads/num_kv_heads do not divide: {shape}")
        if self.audio_num_codebooks < 2:
            raise ValueError("CSM needs at least 2 codebooks (one from the backbone, the rest decoded)")

    @property
    def frame_width(self) -> int:
        return self.audio_num_codebooks + 1

    @classmethod
    def full(cls) -> CsmModelConfig:
        return cls()

    @classmethod
    def tiny(cls, *, audio_num_codebooks: int = 32, max_seq_len: int = 256) -> CsmModelConfig:
        """A random-weight toy with the real structure, for tests and CPU benchmarks."""
        return cls(
            backbone=LlamaShape(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128),
            decoder=LlamaShape(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64),
            text_vocab_size=512,
            audio_vocab_size=64,
            audio_num_codebooks=audio_num_codebooks,
            max_seq_len=max_seq_len,
        )


class StaticKVCache(KVCache):
    """torchtune's KVCache, minus its host syncs.

    The parent asserts the write fits (a GPU->CPU read on every layer of every step) and reads the
    fill level with .item() on reset. The generator guarantees the fit by trimming the prompt, so
    here a write is a plain in-place index and a reset never leaves the device.
    """

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = k_val.shape[2]  # k_val, v_val: (B, n_kv, S, head_dim)
        positions = self.cache_pos[:seq_len]
        self.k_cache[:, :, positions] = k_val
        self.v_cache[:, :, positions] = v_val
        self.cache_pos.add_(seq_len)
        return self.k_cache, self.v_cache

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
        torch.arange(self.cache_pos.numel(), out=self.cache_pos)


class SlotCursor:
    """Where a stack's next forward writes its keys and values: its slot range and each row's positions.

    torchtune's attention hands a cache only the new keys and values, so the batched step points
    every layer's cache here (one cursor per stack) before each forward. Set from eager code.
    """

    def __init__(self) -> None:
        self.rows = slice(0, 1)  # the slots this forward runs on (the batch's rows)
        self.index = torch.zeros(1, 1, dtype=torch.long)  # (b, 1): 0..b-1, each row within `rows`
        self.positions = torch.zeros(1, 1, dtype=torch.long)  # (b, S): where each row writes

    def point(self, rows: slice, index: torch.Tensor, positions: torch.Tensor) -> None:
        self.rows, self.index, self.positions = rows, index, positions


class SlotKVCache(nn.Module):
    """A KV cache of `slots` rows, each row one reply's own context, written at that row's positions.

    Rows join and leave between frames: a new reply's prompt overwrites its slot from position 0, and
    the causal mask never lets a position read a slot's stale tail, so a freed slot needs no reset.
    """

    def __init__(self, slots: int, length: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 cursor: SlotCursor) -> None:
        super().__init__()
        shape = (slots, num_kv_heads, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.cursor = cursor

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, n_kv, S, head_dim) new keys/values -> the b rows' whole caches, these written in."""
        cursor = self.cursor
        k, v = self.k_cache[cursor.rows], self.v_cache[cursor.rows]  # views: written in place
        k[cursor.index, :, cursor.positions] = k_val.transpose(1, 2)  # [(b, S), :] <- (b, S, n_kv, hd)
        v[cursor.index, :, cursor.positions] = v_val.transpose(1, 2)
        return k, v

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def move(self, source: int, target: int) -> None:
        """Copy one slot's context into another (compacting the batch when a row leaves)."""
        self.k_cache[target] = self.k_cache[source]
        self.v_cache[target] = self.v_cache[source]


def _llama(shape: LlamaShape, config: CsmModelConfig, max_seq_len: int) -> TransformerDecoder:
    """A torchtune Llama 3.2 stack that takes and returns hidden states (no token table, no head)."""
    stack = llama3_2(
        vocab_size=1,  # replaced below: CSM embeds frames itself
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        embed_dim=shape.embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=shape.intermediate_dim,
        norm_eps=config.norm_eps,
        rope_base=config.rope_base,
        scale_factor=config.rope_scale_factor,
    )
    stack.tok_embeddings = nn.Identity()
    stack.output = nn.Identity()
    return stack


class CsmModel(nn.Module):
    """Backbone + depth decoder with CSM's embeddings and heads (original checkpoint names)."""

    def __init__(self, config: CsmModelConfig) -> None:
        super().__init__()
        self.config = config
        dim, dec_dim = config.backbone.embed_dim, config.decoder.embed_dim
        k, vocab = config.audio_num_codebooks, config.audio_vocab_size
        self.backbone = _llama(config.backbone, config, config.max_seq_len)
        # The decoder sees one frame at a time: backbone state + codebook 0, then codebooks 1..K-2.
        self.decoder = _llama(config.decoder, config, k)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, dim)
        # One table for all codebooks: codebook i's code c is row i * vocab + c.
        self.audio_embeddings = nn.Embedding(vocab * k, dim)
        self.projection = nn.Linear(dim, dec_dim, bias=False)
        self.codebook0_head = nn.Linear(dim, vocab, bias=False)
        self.audio_head = nn.Parameter(torch.empty(k - 1, dec_dim, vocab))  # head i predicts codebook i+1
        if not self.audio_head.is_meta:
            nn.init.normal_(self.audio_head, std=0.02)  # torch.empty may hold NaNs; checkpoints overwrite it
        self.register_buffer("audio_offsets", torch.arange(k) * vocab, persistent=False)  # (K,)
        self.slots: int | None = None  # the KV caches' rows when batched (setup_caches)

    def prepare(self, *, device: torch.device | str, dtype: torch.dtype) -> CsmModel:
        """Move to `device`/`dtype` for inference: eval mode, float32 RoPE tables, caches allocated.

        Also completes a model built on the meta device and loaded with assign=True: its
        non-persistent buffers (codebook offsets, RoPE tables) were never materialised.
        """
        k, vocab = self.config.audio_num_codebooks, self.config.audio_vocab_size
        self.audio_offsets = torch.arange(k, device=device) * vocab  # (K,)
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for module in self.modules():
            if isinstance(module, Llama3ScaledRoPE):
                with torch.device(device):
                    module.rope_init()  # float32 even in a bf16 model, as .to(dtype) would round them
        self.setup_caches(dtype)
        return self

    # ---- caches: allocated once, for the largest context, reused by every utterance ----

    def setup_caches(self, dtype: torch.dtype, slots: int | None = None) -> None:
        """Allocate both KV caches and causal masks on the model's device: for one reply (batch 1,
        the default), or with `slots` rows for batched replies (SlotKVCache, see batch.py).

        The masks are buffers, not plain attributes, so that a compiled step treats them as fixed
        addresses (a CUDA graph then reads them in place instead of copying them in every replay).
        """
        device = self.text_embeddings.weight.device
        self.slots = slots
        self.backbone_cursor, self.decoder_cursor = SlotCursor(), SlotCursor()
        for name, stack, length, cursor in (
            ("backbone", self.backbone, self.config.max_seq_len, self.backbone_cursor),
            ("decoder", self.decoder, self.config.audio_num_codebooks, self.decoder_cursor),
        ):
            for layer in stack.layers:
                attn = layer.attn
                shape = (length, attn.num_kv_heads, attn.head_dim, dtype)
                cache = StaticKVCache(1, *shape) if slots is None else SlotKVCache(slots, *shape, cursor=cursor)
                attn.kv_cache = cache.to(device)
                attn.cache_enabled = True
            # mask[p] = which cache slots the token at position p may attend to: (length, length)
            causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
            self.register_buffer(f"{name}_mask", causal, persistent=False)

    def reset_caches(self) -> None:
        """Forget the whole context (start of an utterance)."""
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    def move_slot(self, source: int, target: int) -> None:
        """Move one batched reply's backbone context to another slot (the decoder's lasts one frame)."""
        for layer in self.backbone.layers:
            layer.attn.kv_cache.move(source, target)

    def reset_decoder_cache(self) -> None:
        """Forget the previous frame's codebooks (start of a frame)."""
        self.decoder.reset_caches()

    # ---- the pieces of one frame step ----

    def embed_frames(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S, K+1) tokens and bool mask -> (B, S, D): the sum of each row's real columns."""
        text = self.text_embeddings(tokens[..., -1]).unsqueeze(-2)  # (B, S, 1, D)
        audio = self.audio_embeddings(tokens[..., :-1] + self.audio_offsets)  # (B, S, K, D)
        columns = torch.cat([audio, text], dim=-2)  # (B, S, K+1, D)
        return (columns * mask.unsqueeze(-1)).sum(dim=-2)

    def embed_audio(self, codebook: int | torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B, 1) codes of one codebook (an int, or a 0-d device tensor in a compiled step) -> (B, 1, D)."""
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    def backbone_hidden(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, S, D) embeddings at (B, S) positions -> (B, S, D) normed hidden states; fills the cache."""
        mask = self.backbone_mask[positions]  # (B, S, max_seq_len)
        return self.backbone(embeds, mask=mask, input_pos=positions)

    def codebook0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, D) last backbone state -> (B, V) logits of codebook 0."""
        return self.codebook0_head(hidden)

    def decoder_hidden(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, S, D) backbone-width inputs at (B, S) positions -> (B, S, d) decoder states; fills its cache."""
        mask = self.decoder_mask[positions]  # (B, S, K)
        return self.decoder(self.projection(embeds), mask=mask, input_pos=positions)

    def decoder_logits(
        self, embeds: torch.Tensor, positions: torch.Tensor, codebook: int | torch.Tensor
    ) -> torch.Tensor:
        """(B, S, D) inputs at (B, S) positions -> (B, V) logits of `codebook` (1..K-1; int or 0-d tensor)."""
        hidden = self.decoder_hidden(embeds, positions)  # (B, S, d)
        if isinstance(codebook, int):
            head = self.audio_head[codebook - 1]  # (d, V)
        else:  # index_select, not [tensor]: a 0-d tensor index would be read back to the host
            head = self.audio_head.index_select(0, (codebook - 1).reshape(1))[0]
        return hidden[:, -1] @ head  # (B, d) @ (d, V)
