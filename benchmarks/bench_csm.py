"""Speed of CSM streaming synthesis: time per frame, real-time factor, time to the first chunk.

Builds the network at a given size with random weights and an untrained full-size Mimi, so it
runs anywhere without downloads (random weights never say EOS, so every utterance runs to its
frame cap: the numbers are per frame and do not depend on what is said). Prints a summary and
writes JSON:

    uv run python benchmarks/bench_csm.py --size tiny --out bench-results/csm-tiny-cpu.json
    uv run python benchmarks/bench_csm.py --size full --device cuda --out bench-results/csm-full-gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.tts.csm.generator import SAMPLES_PER_FRAME, CsmGenerator, GenerationConfig
from app.tts.csm.loader import load_text_tokenizer
from app.tts.csm.model import CsmModel, CsmModelConfig
from tests.support import build_tokenizer_json

TEXTS = [
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I can help you plan a trip, cook dinner, or just chat for a while.",
]


def build_tokenizer() -> Path:
    """A byte-level BPE trained on the benchmark texts (the Llama tokenizer needs a download)."""
    return build_tokenizer_json(Path(tempfile.mkdtemp()) / "tokenizer.json", TEXTS)


def build_generator(size: str, device: torch.device, dtype: torch.dtype, seed: int) -> CsmGenerator:
    from moshi.models import loaders

    torch.manual_seed(seed)
    config = CsmModelConfig.full() if size == "full" else CsmModelConfig.tiny(max_seq_len=512)
    with torch.device(device):
        model = CsmModel(config)
    model.prepare(device=device, dtype=dtype)
    mimi = loaders.get_mimi(None, device=device, num_codebooks=32)
    return CsmGenerator(model, load_text_tokenizer(str(build_tokenizer())), mimi, seed=seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_utterance(generator: CsmGenerator, text: str, config: GenerationConfig, frames: int) -> dict:
    """Wall time of one streamed utterance as a caller sees it (chunks are already on the CPU)."""
    start = time.perf_counter()
    first = None
    samples = 0
    for pcm in generator.utterance(text, speaker=4, config=config, max_frames=frames):
        first = time.perf_counter() - start if first is None else first
        samples += len(pcm)
    wall = time.perf_counter() - start
    audio = samples / 24_000
    return {"text": text, "frames": samples // SAMPLES_PER_FRAME, "wall_s": wall, "audio_s": audio,
            "first_chunk_s": first, "rtf": wall / audio if audio else None,
            "ms_per_frame": 1000 * wall / max(1, samples // SAMPLES_PER_FRAME)}


def time_parts(generator: CsmGenerator, config: GenerationConfig, frames: int) -> dict:
    """The frame step alone (backbone + 31 decoder steps) and Mimi decoding alone, per frame."""
    device = generator.device
    utterance = generator.utterance(TEXTS[0], speaker=4, config=config, max_frames=frames)
    with torch.no_grad():
        generator.model.reset_caches()
        sync(device)
        start = time.perf_counter()
        chunks = list(generator.frame_chunks(utterance.prompt, config, cancel=None))
        sync(device)
        step = (time.perf_counter() - start) / frames
        generator.start_mimi()
        start = time.perf_counter()
        for chunk in chunks:
            generator.decode(chunk)
        mimi = (time.perf_counter() - start) / frames
    return {"frame_step_ms": 1000 * step, "mimi_decode_ms": 1000 * mimi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=40, help="frames per utterance (12.5 a second)")
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--first-chunk-frames", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    generator = build_generator(args.size, device, dtype, args.seed)
    build_s = time.perf_counter() - start
    config = GenerationConfig(first_chunk_frames=args.first_chunk_frames, chunk_frames=args.chunk_frames)
    warm = time_utterance(generator, "Warm up.", config, frames=12)  # first-call costs, not counted
    runs = [time_utterance(generator, TEXTS[i % len(TEXTS)], config, args.frames) for i in range(args.utterances)]
    parts = time_parts(generator, config, args.frames)
    summary = {
        "size": args.size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "build_s": build_s,
        "first_chunk_frames": args.first_chunk_frames, "chunk_frames": args.chunk_frames,
        "warm_up_s": warm["wall_s"], "median_ms_per_frame": statistics.median(r["ms_per_frame"] for r in runs),
        "median_rtf": statistics.median(r["rtf"] for r in runs),
        "median_first_chunk_s": statistics.median(r["first_chunk_s"] for r in runs), **parts, "runs": runs,
    }
    print(f"CSM {args.size} on {device} ({summary['dtype']}), {args.utterances} x {args.frames} frames:")
    print(f"  time per frame   {summary['median_ms_per_frame']:.1f} ms  (frame step {parts['frame_step_ms']:.1f}"
          f" ms + Mimi decode {parts['mimi_decode_ms']:.1f} ms)")
    print(f"  real-time factor {summary['median_rtf']:.2f}  (< 1 is faster than real time; a frame is 80 ms)")
    print(f"  first chunk      {1000 * summary['median_first_chunk_s']:.0f} ms  ({args.first_chunk_frames} frames)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
        print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
