"""Where CSM's parts come from and how their files become ready modules.

Three references, each a local path or a Hugging Face repo id (downloaded on first use, then cached):
  - the CSM checkpoint, in either published key layout:
      original (Sesame's models.py names: sesame/csm-1b ckpt.pt or model.safetensors,
                senstella/csm-expressiva-1b ckpt.safetensors), loaded as it is;
      transformers (CsmForConditionalGeneration: unsloth/csm-1b, today's sesame/csm-1b), renamed to
                the original names and with q/k rows un-permuted (transformers rotates half-vectors,
                torchtune rotates interleaved pairs, so the conversion reordered the rows of each head);
  - the Llama-3.2 text tokenizer (any `tokenizers` tokenizer.json);
  - the Mimi codec (moshi's safetensors, used with all 32 codebooks).
A checkpoint that does not fit is refused with the missing and unexpected keys named, and a
config.json that asks for RoPE, norm or head arithmetic the network lacks by the field (config_json.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from tokenizers import Tokenizer

from app.models import ModelError, hub_download
from app.tts.csm import config_json
from app.tts.csm.model import FLAVORS, CsmModel, CsmModelConfig, LlamaShape

if TYPE_CHECKING:
    from app.loading import LoadStatus

log = logging.getLogger(__name__)

MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"  # moshi.models.loaders.MIMI_NAME
# File names tried in a CSM repo or folder, in order, unless the settings name one.
CHECKPOINT_FILES = ("model.safetensors", "ckpt.safetensors", "model.safetensors.index.json", "ckpt.pt")
# Repos whose weights are not under the first generic name (senstella's also holds an MLX copy).
KNOWN_CHECKPOINTS = {"senstella/csm-expressiva-1b": ("ckpt.safetensors",)}


class ModelNotAvailableError(ModelError):
    """A CSM file is neither on disk nor downloadable; the message says which and what to do."""

    def __init__(self, ref: str, problem: str, hint: str = "Check the reference in the tts.csm settings.") -> None:
        super().__init__("tts", ref, problem, hint)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the CSM network."""


# ---------------------------------------------------------------- references: local path or hub


def _is_repo_id(ref: str) -> bool:
    """'owner/name' and nothing that only a path would have."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref) is not None and not ref.startswith(".")


def resolve_file(
    ref: str, filenames: Sequence[str], *, what: str, offline: bool = False, status: LoadStatus | None = None
) -> Path:
    """A local file, the first of `filenames` in a local folder, or a hub download of the first that exists.

    `ref` is a path or a hub repo id, with or without the project's `hf:` prefix; a download reports
    its progress to `status`.
    """
    ref = ref.removeprefix("hf:")
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise ModelNotAvailableError(ref, f"{what}: the folder holds none of {', '.join(filenames)}")
    if not _is_repo_id(ref):
        raise ModelNotAvailableError(ref, f"{what}: no such file or folder, and not a hub repo id")
    for name in filenames:  # a cached copy wins, without touching the network
        cached = try_to_load_from_cache(ref, name)
        if isinstance(cached, str):
            return Path(cached)
    if offline or hub_constants.HF_HUB_OFFLINE:
        raise ModelNotAvailableError(ref, _offline_problem(filenames[0], what, "offline mode is on"), _OFFLINE_HINT)
    for name in filenames:
        try:
            return _download(ref, name, what=what, status=status)
        except LocalEntryNotFoundError:
            problem = _offline_problem(name, what, "the hub cannot be reached")
            raise ModelNotAvailableError(ref, problem, _OFFLINE_HINT) from None
        except EntryNotFoundError:
            continue  # not in this repo: try the next name
    raise ModelNotAvailableError(
        ref, f"{what}: the hub repo has none of {', '.join(filenames)}", "Name the file in the settings."
    )


_OFFLINE_HINT = (
    "Start once with internet access to download it into the Hugging Face cache "
    "(HF_HOME, kept between runs), set the reference to a local copy, or use --preset cpu, which runs offline"
)


def _offline_problem(filename: str, what: str, reason: str) -> str:
    return f"{what} ({filename}) is not on this machine and {reason}"


def _download(repo: str, filename: str, *, what: str, status: LoadStatus | None = None) -> Path:
    log.info("%s: downloading %s from hub repo %s (first launch only; cached afterwards)", what, filename, repo)
    start = time.monotonic()
    label = what.split(" (", 1)[0]  # "CSM checkpoint (setting `model`)" -> "CSM checkpoint"
    try:
        path = hub_download(repo, filename, label, status)
    except GatedRepoError:
        hint = "Accept its licence on huggingface.co and set HF_TOKEN, or use an ungated copy (unsloth/csm-1b)"
        raise ModelNotAvailableError(repo, f"{what}: the hub repo is gated", hint) from None
    except RepositoryNotFoundError:
        hint = "Check the repo id; a private repo needs HF_TOKEN"
        raise ModelNotAvailableError(repo, f"{what}: no such hub repo", hint) from None
    size_mb = path.stat().st_size / 1e6
    log.info("%s: %s ready (%.0f MB in %.0f s)", what, filename, size_mb, time.monotonic() - start)
    return path


def resolve_checkpoint(
    ref: str, filename: str | None = None, *, offline: bool = False, status: LoadStatus | None = None
) -> list[Path]:
    """The checkpoint file(s) of a CSM reference: several when the checkpoint is sharded."""
    ref = ref.removeprefix("hf:")
    names = (filename,) if filename else KNOWN_CHECKPOINTS.get(ref, CHECKPOINT_FILES)
    first = resolve_file(ref, names, what="CSM checkpoint (setting `model`)", offline=offline, status=status)
    if not first.name.endswith(".index.json"):
        return [first]
    shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
    base = ref if _is_repo_id(ref) and not Path(ref).exists() else str(first.parent)
    return [
        resolve_file(base, (s,), what=f"CSM checkpoint shard {s}", offline=offline, status=status) for s in shards
    ]


def resolve_config_json(ref: str, checkpoint: Path, *, offline: bool = False) -> dict[str, Any] | None:
    """The config.json next to a checkpoint (transformers' or Sesame's), if there is one."""
    ref = ref.removeprefix("hf:")
    candidate = checkpoint.parent / "config.json"
    if candidate.is_file():
        return json.loads(candidate.read_text())
    if _is_repo_id(ref) and not Path(ref).exists():
        cached = try_to_load_from_cache(ref, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
        if not (offline or hub_constants.HF_HUB_OFFLINE):
            try:
                return json.loads(Path(hf_hub_download(ref, "config.json")).read_text())
            except (EntryNotFoundError, OSError):
                return None
    return None


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


def rename_transformers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names -> original names; drops the bundled Mimi and the tied embedding copy."""
    audio_key = "backbone_model.embed_tokens.embed_audio_tokens.weight"
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
    path = resolve_file(ref, ("tokenizer.json",), what="CSM text tokenizer (setting `tokenizer`)", offline=offline)
    tokenizer = Tokenizer.from_file(str(path))
    ids = {token: tokenizer.token_to_id(token) for token in (bos_token, eos_token)}
    absent = [token for token, i in ids.items() if i is None]
    if absent:
        raise ValueError(f"tokenizer {path} has no {' / '.join(absent)} token")
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

    path = resolve_file(ref, (filename,), what="Mimi codec (setting `mimi`)", offline=offline)
    return loaders.get_mimi(path, device=device, num_codebooks=num_codebooks)
