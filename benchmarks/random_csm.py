"""Write a random-weight CSM model folder that the `tts.csm` settings can load, for runs without the hub.

The gpu preset's latency and memory depend on the network's size, not on its weights, so a machine
that cannot download Sesame's checkpoint can still run the whole preset at full size:

    uv run python benchmarks/random_csm.py --size full --out /tmp/csm-random
    VA_TTS__CSM__MODEL=/tmp/csm-random VA_TTS__CSM__TOKENIZER=/tmp/csm-random/tokenizer.json \\
    VA_TTS__CSM__MIMI=/tmp/csm-random/mimi.safetensors \\
        uv run python benchmarks/bench_latency.py --preset gpu --turns 5

The folder holds ckpt.safetensors (Sesame's key layout; the loader reads the sizes off it), a
config.json with the head counts, mimi.safetensors (Mimi at its real size, untrained) and a small
byte-level tokenizer.json.
Random weights never say EOS: every phrase is spoken to its length cap, as noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_csm import TEXTS  # run as a script: benchmarks/ is on sys.path
from safetensors.torch import save_file

from app.engines.tts.csm.model import CsmModel, CsmModelConfig
from tests.support import build_tokenizer_json


def write_folder(out: Path, size: str, seed: int) -> None:
    from moshi.models import loaders

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CsmModelConfig.full() if size == "full" else CsmModelConfig.tiny(max_seq_len=512)
    model = CsmModel(config).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "ckpt.safetensors"))
    del model
    # The loader reads the sizes off the checkpoint; only head counts and context need saying, as
    # transformers' config.json says them (a tiny model matches none of the published flavours).
    hints = {
        "num_attention_heads": config.backbone.num_heads, "num_key_value_heads": config.backbone.num_kv_heads,
        "max_position_embeddings": config.max_seq_len, "rope_theta": config.rope_base,
        "depth_decoder_config": {"num_attention_heads": config.decoder.num_heads,
                                 "num_key_value_heads": config.decoder.num_kv_heads},
    }
    (out / "config.json").write_text(json.dumps(hints, indent=2))
    mimi = loaders.get_mimi(None, device="cpu", num_codebooks=32)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in mimi.state_dict().items()},
              str(out / "mimi.safetensors"))
    build_tokenizer_json(out / "tokenizer.json", TEXTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_folder(args.out, args.size, args.seed)
    print(f"wrote a random {args.size} CSM to {args.out}; use it with")
    print(f"  VA_TTS__CSM__MODEL={args.out} VA_TTS__CSM__TOKENIZER={args.out / 'tokenizer.json'} "
          f"VA_TTS__CSM__MIMI={args.out / 'mimi.safetensors'}")


if __name__ == "__main__":
    main()
