"""Speed of CSM streaming synthesis: time per frame, real-time factor, time to the first chunk.

Builds the network at a given size with random weights and an untrained full-size Mimi, so it
runs anywhere without downloads (random weights never say EOS, so every utterance runs to its
frame cap: the numbers are per frame and do not depend on what is said). Prints a summary and
writes JSON. `--compile both` measures the eager and the compiled frame step on the same weights in
one run, and ends with the line `compiled/eager frames per second: X.XX`:

    uv run python benchmarks/bench_csm.py --size tiny --compile both --out bench-results/csm-tiny-cpu.json
    uv run python benchmarks/bench_csm.py --size full --device cuda --compile both --out bench-results/csm-full-gpu.json

`--batch B` instead makes the same B x `--utterances` replies of `--frames` frames twice on the same
weights: one at a time (the single-reply frame step), then through a CsmBatch of B rows (one frame step
for all of them, a reply joining as soon as a slot frees), and ends with the line
`batched/single aggregate frames per second at B=4: X.XX`. These are frames of codes per second, the
chunk transfers and stop checks included and Mimi's decoding left out (one decode a frame either way):

    uv run python benchmarks/bench_csm.py --size tiny --batch 4
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

from app.engines.tts.csm.batch import CsmBatch
from app.engines.tts.csm.generator import SAMPLES_PER_FRAME, CsmGenerator, GenerationConfig, Prompt, StopRules
from app.engines.tts.csm.loader import load_text_tokenizer
from app.engines.tts.csm.model import CsmModel, CsmModelConfig
from app.engines.tts.csm.step import compile_mode
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


def measure(generator: CsmGenerator, config: GenerationConfig, args: argparse.Namespace) -> dict:
    """Warm up, then time `args.utterances` utterances and the frame step alone."""
    device = generator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = time_utterance(generator, "Warm up.", config, frames=12)  # first-call costs, not counted
    runs = [time_utterance(generator, TEXTS[i % len(TEXTS)], config, args.frames) for i in range(args.utterances)]
    parts = time_parts(generator, config, args.frames)
    ms_per_frame = statistics.median(r["ms_per_frame"] for r in runs)
    return {
        "compiled": generator.step.compiled, "warm_up_s": warm["wall_s"], "median_ms_per_frame": ms_per_frame,
        "frames_per_s": 1000 / ms_per_frame, "median_rtf": statistics.median(r["rtf"] for r in runs),
        "median_first_chunk_s": statistics.median(r["first_chunk_s"] for r in runs), **parts,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "runs": runs,
    }


def compile_step(generator: CsmGenerator, config: GenerationConfig) -> float:
    """Compile the frame step as the server's warm-up does; seconds, or raise if it fell back to eager."""
    mode = compile_mode("on", generator.device)
    assert mode is not None
    start = time.perf_counter()
    generator.step.compile(mode)
    generator.step.warm(topk=config.topk, temperature=config.temperature)
    if not generator.step.compiled:
        raise SystemExit("compiling the frame step failed (see the warning above)")
    return time.perf_counter() - start


def batch_prompts(generator: CsmGenerator, config: GenerationConfig, count: int, frames: int) -> list[Prompt]:
    """`count` replies of different texts and speakers (so different prompt lengths), `frames` frames each."""
    return [generator.utterance(TEXTS[i % len(TEXTS)], speaker=i % 5, config=config, max_frames=frames).prompt
            for i in range(count)]


def frames_alone(generator: CsmGenerator, config: GenerationConfig, prompts: list[Prompt]) -> float:
    """Frames of codes per second, one reply after another (per chunk: one transfer, the stop rules)."""
    sync(generator.device)
    start, total = time.perf_counter(), 0
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            generator.rng.manual_seed(i)
            generator.model.reset_caches()
            stops = StopRules(config.repeat_stop_frames)
            for chunk in generator.frame_chunks(prompt, config, cancel=None):
                total += chunk.shape[0]
                if stops.scan(chunk.cpu())[1]:
                    break
    return total / (time.perf_counter() - start)


def frames_batched(batch: CsmBatch, config: GenerationConfig, prompts: list[Prompt]) -> float:
    """Frames of codes per second through the batch: a waiting reply joins whenever a slot is free."""
    device = batch.device
    waiting, rows = list(enumerate(prompts)), []
    sync(device)
    start = time.perf_counter()
    while waiting or batch.live():
        while waiting and batch.free_slots():
            i, prompt = waiting.pop(0)
            rows.append(batch.join(prompt, config, rng=torch.Generator(device=device).manual_seed(i)))
        batch.advance()
    return sum(row.frames for row in rows) / (time.perf_counter() - start)


def measure_batch(generator: CsmGenerator, config: GenerationConfig, args: argparse.Namespace) -> dict:
    """The same replies one at a time and through a batch of `args.batch` rows, on the same weights."""
    model, size = generator.model, args.batch
    prompts = batch_prompts(generator, config, size * args.utterances, args.frames)
    warm = batch_prompts(generator, config, size, 6)
    frames_alone(generator, config, warm[:1])  # first-call costs, not counted
    alone = frames_alone(generator, config, prompts)
    dtype = model.text_embeddings.weight.dtype
    model.setup_caches(dtype, slots=size)
    try:
        batch = CsmBatch(model, generator.sampled_vocab)
        frames_batched(batch, config, warm)
        batched = frames_batched(batch, config, prompts)
    finally:
        model.setup_caches(dtype)  # back to the single-reply caches
    print(f"  {len(prompts)} replies of {args.frames} frames, frames of codes per second (Mimi not included):")
    print(f"    one at a time     {alone:.1f}")
    print(f"    batched, B={size}      {batched:.1f}  (all rows together)")
    return {"batch": size, "replies": len(prompts), "alone_frames_per_s": alone, "batched_frames_per_s": batched,
            "batched_over_alone": batched / alone}


def report(name: str, result: dict, args: argparse.Namespace) -> None:
    print(f"  {name}:")
    print(f"    frames per second {result['frames_per_s']:.1f}  ({result['median_ms_per_frame']:.1f} ms a frame:"
          f" frame step {result['frame_step_ms']:.1f} ms + Mimi decode {result['mimi_decode_ms']:.1f} ms)")
    print(f"    real-time factor  {result['median_rtf']:.2f}  (< 1 is faster than real time; a frame is 80 ms)")
    print(f"    first chunk       {1000 * result['median_first_chunk_s']:.0f} ms  ({args.first_chunk_frames} frames)")
    if result["peak_gpu_memory_gb"] is not None:
        print(f"    peak GPU memory   {result['peak_gpu_memory_gb']:.2f} GiB")


def write(summary: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        print(f"  wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=40, help="frames per utterance (12.5 a second)")
    parser.add_argument("--utterances", type=int, default=3)
    parser.add_argument("--first-chunk-frames", type=int, default=2)
    parser.add_argument("--chunk-frames", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="the frame step eager, compiled (torch.compile; CUDA graphs on a GPU), or both in turn")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for the tiny model, whose ops are too small to split)")
    parser.add_argument("--batch", type=int, default=None,
                        help="compare one-at-a-time with a batch of this many rows (eager; see above)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads or args.size == "tiny":
        torch.set_num_threads(args.threads or 1)
    start = time.perf_counter()
    generator = build_generator(args.size, device, dtype, args.seed)
    build_s = time.perf_counter() - start
    config = GenerationConfig(first_chunk_frames=args.first_chunk_frames, chunk_frames=args.chunk_frames)
    summary = {
        "size": args.size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "build_s": build_s,
        "first_chunk_frames": args.first_chunk_frames, "chunk_frames": args.chunk_frames,
    }
    print(f"CSM {args.size} on {device} ({summary['dtype']}, {torch.get_num_threads()} CPU threads),"
          f" {args.utterances} x {args.frames} frames:")
    if args.batch:
        summary["batched"] = measure_batch(generator, config, args)
        write(summary, args.out)
        print(f"batched/single aggregate frames per second at B={args.batch}:"
              f" {summary['batched']['batched_over_alone']:.2f}")
        return
    if args.compile in ("off", "both"):
        summary["eager"] = measure(generator, config, args)
        report("eager", summary["eager"], args)
    if args.compile in ("on", "both"):
        summary["compile_s"] = compile_step(generator, config)
        print(f"  compiling the frame step took {summary['compile_s']:.1f} s (once, at start-up; not counted)")
        summary["compiled"] = measure(generator, config, args)
        report("compiled", summary["compiled"], args)
    if args.compile == "both":
        eager, compiled = summary["eager"], summary["compiled"]
        summary["compiled_over_eager_step"] = eager["frame_step_ms"] / compiled["frame_step_ms"]
        summary["compiled_over_eager_fps"] = compiled["frames_per_s"] / eager["frames_per_s"]
        print(f"  the frame step alone, compiled/eager speed: {summary['compiled_over_eager_step']:.2f}"
              " (frames per second below include Mimi's decoding, the same in both)")
    write(summary, args.out)
    if args.compile == "both":  # last, so that scripts can read it off the final line
        print(f"compiled/eager frames per second: {summary['compiled_over_eager_fps']:.2f}")


if __name__ == "__main__":
    main()
