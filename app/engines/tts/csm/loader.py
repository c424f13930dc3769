"""Where CSM's parts come from and how their files become ready modules.

Three references, each resolved by app/engines/models.py like every model reference (a local file or folder,
`hf:` or a bare hub repo id, downloaded on first use, then cached); `resolve_files` finds all of them,
at start-up before any model loads (fetching.py), and engine.py's load_csm_engine loads what it found:
  - the CSM checkpoint, in either published key layout:
      original (Sesame's models.py names: sesame/csm-1b ckpt.pt or model.safetensors,
                senstella/csm-expressiva-1b ckpt.safetensors), loaded as it is;
      transformers (CsmForConditionalGeneration: unsloth/csm-1b, today's sesame/csm-1b), renamed to
                the original names and with q/k rows un-permuted (transformers rotates half-vectors,
                torchtune rotates interleaved pairs, so the conversion reordered the rows of each head);
  - the Llama-3.2 text tokenizer (any `tokenizers` tokenizer.json);
  - the Mimi codec (moshi's safetensors, used with all 32 codebooks).
A checkpoint that does not fit is refused with the missing and unexpected keys named; one whose depth
decoder has codebook embeddings of its own (transformers' tie_codebooks_embeddings off) with both keys
named; a config.json that asks for RoPE, norm or head arithmetic the network lacks by the field
(config_json.py): all are ModelMismatchErrors, which start-up reports in one line.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from tokenizers import Tokenizer

from app.engines import models
from app.engines.models import ModelError, ModelMismatchError
from app.engines.tts.csm import config_json
from app.engines.tts.csm.model import FLAVORS, CsmModel, CsmModelConfig, LlamaShape

if TYPE_CHECKING:
    from app.engines.loading import LoadStatus
    from app.engines.tts.csm.settings import CsmSettings

log = logging.getLogger(__name__)

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"  # moshi.models.loaders.MIMI_NAME
# File names tried in a CSM repo or folder, in order, unless the settings name one.
CHECKPOINT_FILES = ("model.safetensors", "ckpt.safetensors", "model.safetensors.index.json", "ckpt.pt")
# Repos whose weights are not under the first generic name (senstella's also holds an MLX copy).
KNOWN_CHECKPOINTS = {"senstella/csm-expressiva-1b": ("ckpt.safetensors",)}


class CheckpointMismatchError(ModelMismatchError):
    """A checkpoint's keys or shapes do not fit the CSM network."""


# ---------------------------------------------------------------- files: every reference through app.engines.models


class CsmFiles(NamedTuple):
    """Every file CSM loads from, on disk."""

    checkpoint: list[Path]  # several when the checkpoint is sharded
    tokenizer: Path  # tokenizer.json
    mimi: Path  # Mimi's safetensors
    hints: dict[str, Any] | None  # the checkpoint's config.json, when it has one


def resolve_files(settings: CsmSettings, status: LoadStatus | None = None) -> CsmFiles:
    """Every file the settings name, on disk: hub files downloaded on first use, with progress to `status`.

    Start-up fetching calls this before any model loads, and load_csm_engine loads what it returns.
    """
    offline = settings.offline
    checkpoint = resolve_checkpoint(settings.model, settings.checkpoint, offline=offline, status=status)
    return CsmFiles(
        checkpoint=checkpoint,
        tokenizer=_tokenizer_file(settings.tokenizer, offline=offline, status=status),
        mimi=_mimi_file(settings.mimi, settings.mimi_file, offline=offline, status=status),
        hints=resolve_config_json(settings.model, checkpoint[0], offline=offline, status=status),
    )


def resolve_checkpoint(
    ref: str, filename: str | None = None, *, offline: bool = False, status: LoadStatus | None = None
) -> list[Path]:
    """The checkpoint file(s) of a CSM reference: several when the checkpoint is sharded."""
    hub = models.hub_location(ref)
    repo = hub[0] if hub is not None else None
    names = (filename,) if filename else KNOWN_CHECKPOINTS.get(repo or "", CHECKPOINT_FILES)
    what = "CSM checkpoint (setting `model`)"
    first = models.resolve(ref, "tts", status, files=names, what=what, offline=offline)
    if not first.name.endswith(".index.json"):
        return [first]
    shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
    base = f"hf:{repo}" if repo is not None else str(first.parent)  # the index's own folder or repo
    return [
        models.resolve(base, "tts", status, files=(s,), what=f"CSM checkpoint shard {s}", offline=offline)
        for s in shards
    ]


def resolve_config_json(
    ref: str, checkpoint: Path, *, offline: bool = False, status: LoadStatus | None = None
) -> dict[str, Any] | None:
    """The config.json next to a checkpoint (transformers' or Sesame's), if there is one."""
    beside = checkpoint.parent / "config.json"
    if beside.is_file():
        return json.loads(beside.read_text())
    hub = models.hub_location(ref)
    if hub is None:
        return None
    try:
        path = models.resolve(f"hf:{hub[0]}", "tts", status, files=("config.json",), what="CSM config.json",
                              offline=offline)
    except ModelError:
        return None  # optional: the tensors give the sizes, and CSM-1B's arithmetic is the default
    return json.loads(path.read_text())


def _tokenizer_file(ref: str, *, offline: bool, status: LoadStatus | None = None) -> Path:
    what = "CSM text tokenizer (setting `tokenizer`)"
    return models.resolve(ref, "tts", status, files=("tokenizer.json",), what=what, offline=offline)


def _mimi_file(ref: str, filename: str, *, offline: bool, status: LoadStatus | None = None) -> Path:
    return models.resolve(ref, "tts", status, files=(filename,), what="Mimi codec (setting `mimi`)", offline=offline)


# ---------------------------------------------------------------- checkpoint layouts


def read_state_dict(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors or torch checkpoint, on the CPU."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in paths:
        if path.suffix in (".safetensors", ".sft"):
            state.update(load_file(str(path)))
            continue
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict"):  # training scripts often nest the weights
            if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
        state.update(loaded)
    return state


# transformers name -> original name, applied in order (regex, replacement).
_TRANSFORMERS_RENAMES = (
    (r"^backbone_model\.layers\.", "backbone.layers."),
    (r"^depth_decoder\.model\.layers\.", "decoder.layers."),
    (r"\.self_attn\.o_proj\.", ".attn.output_proj."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.gate_proj\.", ".mlp.w1."),
    (r"\.mlp\.down_proj\.", ".mlp.w2."),
    (r"\.mlp\.up_proj\.", ".mlp.w3."),
    (r"\.input_layernorm\.weight$", ".sa_norm.scale"),
    (r"\.post_attention_layernorm\.weight$", ".mlp_norm.scale"),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.scale"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.scale"),
    (r"^embed_text_tokens\.", "text_embeddings."),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.", "audio_embeddings."),
    (r"^lm_head\.", "codebook0_head."),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.", "projection."),
)
_AUDIO_EMBEDDINGS = "backbone_model.embed_tokens.embed_audio_tokens.weight"
_TIED_DECODER_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"  # a copy of the audio embeddings


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix every key shares (torch.compile's `_orig_mod.`, DDP's `module.`, `model.`)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in ("_orig_mod.", "module.", "model."):
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def is_transformers_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("backbone_model.", "depth_decoder.")) for k in state)


def check_tied_embeddings(state: dict[str, torch.Tensor], hints: dict[str, Any] | None) -> None:
    """Refuse a transformers checkpoint whose depth decoder has its own codebook embeddings.

    CsmModel, like Sesame's, embeds the decoder's inputs with the backbone's audio table, and the
    transformers layout drops its copy: loading untied tables would run a different network.
    """
    tied = (hints or {}).get("tie_codebooks_embeddings", True)
    both = _AUDIO_EMBEDDINGS in state and _TIED_DECODER_EMBEDDINGS in state
    if both and torch.equal(state[_AUDIO_EMBEDDINGS], state[_TIED_DECODER_EMBEDDINGS]):
        return
    if both or not tied:
        found = "differs from" if both else "is not stored beside"
        raise CheckpointMismatchError(
            f"untied codebook embeddings: {_TIED_DECODER_EMBEDDINGS} {found} {_AUDIO_EMBEDDINGS} "
            f"(config.json tie_codebooks_embeddings = {tied}); the CSM network shares one table between "
            "the backbone and the depth decoder, as Sesame's CSM-1B does, so it cannot run this checkpoint"
        )


def rename_transformers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names -> original names; drops the bundled Mimi and the tied embedding copy
    (check_tied_embeddings first: that it is a copy)."""
    audio_key = _AUDIO_EMBEDDINGS
    if audio_key not in state and _TIED_DECODER_EMBEDDINGS in state:
        state = {**state, audio_key: state[_TIED_DECODER_EMBEDDINGS]}  # the file kept only the other twin
    renamed = {}
    for key, value in state.items():
        if key.startswith("codec_model.") or key == _TIED_DECODER_EMBEDDINGS:
            continue
        for pattern, replacement in _TRANSFORMERS_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def unpermute_qk(state: dict[str, torch.Tensor], config: CsmModelConfig) -> dict[str, torch.Tensor]:
    """Undo transformers' RoPE row order: per head, rows (half, i) go back to rows (i, half)."""
    out = dict(state)
    for key, weight in state.items():
        match = re.fullmatch(r"(backbone|decoder)\.layers\.\d+\.attn\.([qk])_proj\.weight", key)
        if match is None:
            continue
        shape = config.backbone if match[1] == "backbone" else config.decoder
        heads = shape.num_heads if match[2] == "q" else shape.num_kv_heads
        rows, dim = weight.shape  # (heads * head_dim, embed_dim)
        head_dim = rows // heads
        out[key] = weight.view(heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)
    return out


# ---------------------------------------------------------------- sizes from the checkpoint


def _layer_count(state: dict[str, torch.Tensor], stack: str) -> int:
    indices = [int(m[1]) for k in state if (m := re.match(rf"{stack}\.layers\.(\d+)\.", k))]
    if not indices:
        raise KeyError(f"{stack}.layers")
    return max(indices) + 1


def _heads(stack: str, dim: int, hints: dict[str, Any]) -> tuple[int, int]:
    """(num_heads, num_kv_heads): from config.json when it says, else from the published flavours."""
    hf = hints.get("depth_decoder_config", {}) if stack == "decoder" else hints
    if "num_attention_heads" in hf:
        return hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    flavor = FLAVORS.get(hints.get(f"{stack}_flavor", ""))
    if flavor is None:
        flavor = next((f for f in FLAVORS.values() if f.embed_dim == dim), None)
    if flavor is None or flavor.embed_dim != dim:
        raise CheckpointMismatchError(
            f"cannot tell the attention heads of the {dim}-wide {stack}: give the sizes explicitly (model_config)"
        )
    return flavor.num_heads, flavor.num_kv_heads


def _stack_shape(state: dict[str, torch.Tensor], stack: str, hints: dict[str, Any]) -> LlamaShape:
    dim = state[f"{stack}.layers.0.mlp.w1.weight"].shape[1]
    heads, kv_heads = _heads(stack, dim, hints)
    return LlamaShape(
        num_layers=_layer_count(state, stack),
        num_heads=heads,
        num_kv_heads=kv_heads,
        embed_dim=dim,
        intermediate_dim=state[f"{stack}.layers.0.mlp.w1.weight"].shape[0],
    )


def infer_config(state: dict[str, torch.Tensor], hints: dict[str, Any] | None = None) -> CsmModelConfig:
    """Sizes read off an original-layout state dict; head counts, context and arithmetic from config.json.

    Raises UnsupportedConfigError when config.json asks for RoPE, norm or head arithmetic CsmModel lacks.
    """
    hints = hints or {}
    defaults = CsmModelConfig()
    text_vocab = state["text_embeddings.weight"].shape[0]
    heads_minus_one, _, audio_vocab = state["audio_head"].shape  # (K-1, decoder_dim, V)
    config = CsmModelConfig(
        backbone=_stack_shape(state, "backbone", hints),
        decoder=_stack_shape(state, "decoder", hints),
        text_vocab_size=text_vocab,
        audio_vocab_size=audio_vocab,
        audio_num_codebooks=heads_minus_one + 1,
        max_seq_len=hints.get("max_position_embeddings", defaults.max_seq_len),
        **config_json.arithmetic(hints),
    )
    config_json.check_head_dims(hints, config)
    return config


# ---------------------------------------------------------------- the model


def check_fits(state: dict[str, torch.Tensor], model: CsmModel, source: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected or wrongly shaped key."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    )
    if not (missing or unexpected or wrong):
        return
    parts = [f"{source} does not fit the CSM model {model.config}."]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    raise CheckpointMismatchError(" ".join(parts))


def to_original_layout(
    state: dict[str, torch.Tensor], config: CsmModelConfig | None, hints: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], CsmModelConfig, str]:
    """(state dict in original names, the sizes, the layout's name)."""
    state = strip_wrappers(state)
    layout = "transformers" if is_transformers_layout(state) else "original"
    if layout == "transformers":
        check_tied_embeddings(state, hints)
        state = rename_transformers_keys(state)
    if config is None:
        try:
            config = infer_config(state, hints)
        except KeyError:
            config = CsmModelConfig.full()  # not a CSM checkpoint: let check_fits name what is off
    if layout == "transformers":
        state = unpermute_qk(state, config)
    return state, config, layout


def load_csm_model(
    paths: Sequence[Path],
    *,
    config: CsmModelConfig | None = None,
    hints: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CsmModel:
    """Checkpoint file(s) -> a CsmModel on `device` in `dtype` with caches allocated."""
    start = time.monotonic()
    state, config, layout = to_original_layout(read_state_dict(paths), config, hints)
    with torch.device("meta"):  # no 1B random init just to overwrite it
        model = CsmModel(config)
    check_fits(state, model, source=", ".join(str(p) for p in paths))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.prepare(device=device, dtype=dtype)
    log.info("CSM model (%s layout, %s) loaded in %.1f s", layout, dtype, time.monotonic() - start)
    return model


# ---------------------------------------------------------------- tokenizer, Mimi, voice prompt audio


class TextTokenizer:
    """Llama-3.2 text tokens of one CSM turn: BOS '[speaker]text' EOS."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id

    def encode_turn(self, speaker: int, text: str) -> list[int]:
        ids = self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
        return [self.bos_id, *ids, self.eos_id]


def load_text_tokenizer(
    ref: str, *, bos_token: str = "<|begin_of_text|>", eos_token: str = "<|end_of_text|>", offline: bool = False
) -> TextTokenizer:
    """A tokenizer.json (path, folder or hub repo) with its BOS/EOS ids looked up by name."""
    path = _tokenizer_file(ref, offline=offline)
    tokenizer = Tokenizer.from_file(str(path))
    ids = {token: tokenizer.token_to_id(token) for token in (bos_token, eos_token)}
    absent = [token for token, i in ids.items() if i is None]
    if absent:
        raise ModelMismatchError(f"tokenizer {path} has no {' / '.join(absent)} token")
    return TextTokenizer(tokenizer, bos_id=ids[bos_token], eos_id=ids[eos_token])


def load_mimi(
    ref: str = MIMI_REPO,
    *,
    device: torch.device | str = "cpu",
    num_codebooks: int = 32,
    filename: str = MIMI_FILE,
    offline: bool = False,
) -> Any:
    """moshi's Mimi codec with `num_codebooks` codebooks, in eval mode on `device` (float32)."""
    from moshi.models import loaders

    path = _mimi_file(ref, filename, offline=offline)
    return loaders.get_mimi(path, device=device, num_codebooks=num_codebooks)
