"""CSM's settings, cheap to import (no torch): the config of a server that never loads CSM holds them,
and both the loader and the engine read them."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

DEFAULT_SPEAKERS = {"senstella/csm-expressiva-1b": 4}  # the speaker id that fine-tune was trained as


class CsmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: str = "senstella/csm-expressiva-1b"  # hub repo id or local file/folder (either key layout)
    checkpoint: str | None = None  # file name inside `model`; None = the repo's known name
    tokenizer: str = "unsloth/Llama-3.2-1B"  # tokenizer.json: hub repo, folder or file
    mimi: str = "kyutai/moshiko-pytorch-bf16"
    mimi_file: str = "tokenizer-e351c8d8-checkpoint125.safetensors"
    speaker: int | None = None  # None = the model's known speaker (4 for expressiva), else 0
    temperature: float = 0.9
    topk: int = 50
    device: str = "auto"  # auto = cuda when present, else cpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    # torch.compile the frame step in the warm-up: auto = on with CUDA (as CUDA graphs), off on a CPU
    compile: Literal["auto", "on", "off"] = "auto"
    voice_prompt_wav: str | None = None  # a few seconds of the voice, any audio format
    voice_prompt_text: str | None = None  # its transcript
    context_frames: int = 500  # audio frames (12.5/s) of the assistant's recent utterances kept as context
    first_chunk_frames: int = 2  # 1..4: the first chunk's audio (80 ms a frame)
    chunk_frames: int = 4
    max_audio_seconds: float = 20.0
    repeat_stop_frames: int = 16
    seed: int | None = None
    # Replies that share the frame step (scheduler.py): 1 = one at a time (FrameStep), else up to 8
    # sessions' phrases in one batch, each with its own Mimi decoder (about 0.2 GB each in bf16).
    batch: int = 1
    offline: bool = False  # never reach the hub; only cached or local files
    model_config: dict[str, Any] | None = None  # CsmModelConfig fields; None = read off the checkpoint

    def __post_init__(self) -> None:
        if (self.voice_prompt_wav is None) != (self.voice_prompt_text is None):
            raise ValueError("csm voice_prompt_wav and voice_prompt_text go together: set both or neither")
        if not 1 <= self.batch <= 8:
            raise ValueError("csm batch must be 1..8 (the batched step's largest static size)")
        if self.context_frames < 0:
            raise ValueError("csm context_frames must be >= 0")
        # The same limits GenerationConfig enforces, checked here without importing torch.
        if not 1 <= self.first_chunk_frames <= 4:
            raise ValueError("csm first_chunk_frames must be 1..4 (first audio within 320 ms)")
        if self.chunk_frames < 1 or self.topk < 1 or self.temperature < 0 or self.repeat_stop_frames < 2:
            raise ValueError("csm needs chunk_frames >= 1, topk >= 1, temperature >= 0, repeat_stop_frames >= 2")

    def speaker_id(self) -> int:
        if self.speaker is not None:
            return self.speaker
        return DEFAULT_SPEAKERS.get(self.model.removeprefix("hf:"), 0)
