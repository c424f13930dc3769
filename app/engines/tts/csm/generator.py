"""Text -> a stream of PCM chunks with CSM: the prompt, the frame step, the stops, Mimi decoding.

One utterance:
  1. prompt: context segments (text rows, then their audio frames and an all-zero EOS frame) and
     the new text, trimmed so that prompt + the longest allowed reply fit the KV cache;
  2. frames: each frame step (step.py; compiled on request) samples codebook 0 from the backbone and
     codebooks 1..K-1 from the decoder, all on the device; the generated frame is the next backbone
     input, written in place into a one-row buffer so that every step after the prompt has one shape;
  3. chunks: after `first_chunk_frames` frames, then every `chunk_frames`, the chunk's codes come to
     the CPU in one transfer, the stop rules read them (EOS frame, repeated frames), and Mimi (in
     streaming mode, so its state carries across chunks) turns the kept frames into PCM.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from app.engines.tts.csm.loader import TextTokenizer
from app.engines.tts.csm.model import CsmModel
from app.engines.tts.csm.step import FrameStep, gumbel_noise, pick_code

log = logging.getLogger(__name__)

FRAME_RATE = 12.5  # Mimi frames per second
SAMPLES_PER_FRAME = 1920  # at 24 kHz
EOS_CODE = 0  # a frame whose every code is 0 ends the utterance


class GenerationConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How one utterance is sampled, chunked and stopped."""

    temperature: float = 0.9
    topk: int = 50  # 1 = greedy
    first_chunk_frames: int = 2  # 160 ms: latency of the first audio
    chunk_frames: int = 4  # later chunks; also how often stops are checked (one sync each)
    min_audio_seconds: float = 2.0  # length cap = min + per_char * characters, at most max
    seconds_per_char: float = 0.15
    max_audio_seconds: float = 20.0
    repeat_stop_frames: int = 16  # this many identical frames in a row = stuck: stop

    def __post_init__(self) -> None:
        if not 1 <= self.first_chunk_frames <= 4:
            raise ValueError("first_chunk_frames must be 1..4 (the first audio must come within 320 ms)")
        if self.chunk_frames < 1 or self.topk < 1 or self.temperature < 0 or self.repeat_stop_frames < 2:
            raise ValueError("chunk_frames >= 1, topk >= 1, temperature >= 0, repeat_stop_frames >= 2")

    def max_frames(self, text: str) -> int:
        """The length cap for `text`: generous for its length, so only a runaway reply hits it."""
        seconds = min(self.max_audio_seconds, self.min_audio_seconds + self.seconds_per_char * len(text))
        return max(1, math.ceil(seconds * FRAME_RATE))


@dataclass(frozen=True)
class Segment:
    """One past turn used as context: who spoke, what was said, and the audio codes of it."""

    speaker: int
    text: str
    codes: torch.Tensor  # (frames, K) int64 on the CPU, without the EOS frame


@dataclass(frozen=True)
class Prompt:
    """The backbone's first input and the length budget left for the reply."""

    tokens: torch.Tensor  # (S, K+1) int64
    mask: torch.Tensor  # (S, K+1) bool
    max_frames: int
    segments_used: int


# ---------------------------------------------------------------- prompt rows


def text_rows(token_ids: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text tokens -> frame rows using only the last column: (S, K+1) tokens and mask."""
    tokens = torch.zeros(len(token_ids), width, dtype=torch.long)
    tokens[:, -1] = torch.tensor(token_ids, dtype=torch.long)
    mask = torch.zeros(len(token_ids), width, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, K) codes -> F+1 frame rows using only the audio columns; the last row is the EOS frame."""
    frames = codes.shape[0] + 1
    tokens = torch.zeros(frames, width, dtype=torch.long)
    tokens[:-1, :-1] = codes
    mask = torch.zeros(frames, width, dtype=torch.bool)
    mask[:, :-1] = True
    return tokens, mask


def segment_rows(tokenizer: TextTokenizer, segment: Segment, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    text_tokens, text_mask = text_rows(tokenizer.encode_turn(segment.speaker, segment.text), width)
    audio_tokens, audio_mask = audio_rows(segment.codes, width)
    return torch.cat([text_tokens, audio_tokens]), torch.cat([text_mask, audio_mask])


def build_prompt(
    tokenizer: TextTokenizer,
    *,
    text: str,
    speaker: int,
    context: Sequence[Segment],
    pinned: int,
    max_frames: int,
    capacity: int,
    width: int,
) -> Prompt:
    """Context + text, trimmed so that len(prompt) + max_frames <= capacity (the KV cache length).

    Drops the oldest unpinned segments first, then pinned ones (the voice prompt); a text too long
    to leave a second of room is cut, and the reply cap shrinks to what is left.
    """
    text_ids = tokenizer.encode_turn(speaker, text)
    min_room = min(max_frames, math.ceil(FRAME_RATE))
    if len(text_ids) + min_room > capacity:
        log.warning("CSM: text of %d tokens cut to fit the %d-position context", len(text_ids), capacity)
        text_ids = text_ids[: capacity - min_room - 1] + text_ids[-1:]  # keep the EOS token
    target = text_rows(text_ids, width)
    max_frames = min(max_frames, capacity - len(text_ids))
    rows = [segment_rows(tokenizer, segment, width) for segment in context]
    order = [i for i in range(len(rows)) if i >= pinned] + list(range(min(pinned, len(rows))))
    kept = set(range(len(rows)))
    used = sum(r[0].shape[0] for r in rows) + len(text_ids) + max_frames
    for index in order:  # oldest unpinned first, pinned last
        if used <= capacity:
            break
        kept.discard(index)
        used -= rows[index][0].shape[0]
    parts = [rows[i] for i in sorted(kept)] + [target]
    tokens = torch.cat([p[0] for p in parts])
    mask = torch.cat([p[1] for p in parts])
    return Prompt(tokens=tokens, mask=mask, max_frames=max_frames, segments_used=len(kept))


# ---------------------------------------------------------------- sampling and stops


def sample_topk(
    logits: torch.Tensor, *, topk: int, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) codes, on the device: top-k, temperature, Gumbel-max (no host sync)."""
    gumbel = gumbel_noise(tuple(logits.shape), logits.device, generator)
    return pick_code(logits, gumbel, topk=topk, temperature=temperature)


class StopRules:
    """Reads each chunk's codes on the CPU: the EOS frame and runs of identical frames."""

    def __init__(self, repeat_limit: int) -> None:
        self.repeat_limit = repeat_limit
        self.last: torch.Tensor | None = None
        self.run = 0

    def scan(self, codes: torch.Tensor) -> tuple[int, str | None]:
        """(n, K) codes -> (how many leading frames to keep, stop reason or None)."""
        for i, frame in enumerate(codes):
            if bool((frame == EOS_CODE).all()):
                return i, "eos"
            self.run = self.run + 1 if self.last is not None and torch.equal(frame, self.last) else 1
            self.last = frame
            if self.run >= self.repeat_limit:
                # Keep the first of the identical frames, drop the rest of the run in this chunk.
                return max(0, i + 2 - self.run), "repeat"
        return codes.shape[0], None


# ---------------------------------------------------------------- the generator


class CsmGenerator:
    """Owns the model, tokenizer and Mimi; one utterance at a time (the caller's worker thread)."""

    def __init__(self, model: CsmModel, tokenizer: TextTokenizer, mimi: Any, *, seed: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.device = model.text_embeddings.weight.device
        self.num_codebooks = model.config.audio_num_codebooks
        self.rng = torch.Generator(device=self.device)
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)
        # Codes Mimi cannot decode (2048..2050 of the 2051-entry vocabulary) are never sampled.
        self.sampled_vocab = min(model.config.audio_vocab_size, getattr(mimi, "cardinality", 1 << 30))
        self.step = FrameStep(model, self.sampled_vocab)
        self.decode_frame_by_frame = self.device.type == "cuda"  # see decode()
        self.active: Utterance | None = None

    def generate_frame(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, config: GenerationConfig
    ) -> torch.Tensor:
        """One frame step. (1, S, K+1) rows at (1, S) positions -> (1, K) codes, all on the device."""
        return self.step.frame(tokens, mask, positions, topk=config.topk, temperature=config.temperature,
                               generator=self.rng)

    def frame_chunks(
        self, prompt: Prompt, config: GenerationConfig, cancel: threading.Event | None
    ) -> Iterator[torch.Tensor]:
        """(n, K) device tensors of consecutive frames; ends at prompt.max_frames or on `cancel`."""
        tokens = prompt.tokens.to(self.device)[None]  # (1, S, K+1): the prompt, once
        mask = prompt.mask.to(self.device)[None]
        positions = torch.arange(tokens.shape[1], device=self.device)[None]  # (1, S)
        # After the prompt every step reads the same three small tensors, rewritten in place.
        row = torch.zeros(1, 1, self.num_codebooks + 1, dtype=torch.long, device=self.device)  # text column 0
        row_mask = torch.ones_like(row, dtype=torch.bool)
        row_mask[..., -1] = False  # audio columns only
        # (1, 1), contiguous: a compiled step guards on strides, and a view's would change with S
        position = positions[:, -1:].clone(memory_format=torch.contiguous_format)
        done, size = 0, config.first_chunk_frames
        while done < prompt.max_frames:
            frames = []
            for _ in range(min(size, prompt.max_frames - done)):
                if cancel is not None and cancel.is_set():
                    return
                frame = self.generate_frame(tokens, mask, positions, config)  # (1, K)
                frames.append(frame)
                row[0, :, :-1] = frame
                position.add_(1)
                tokens, mask, positions = row, row_mask, position
            done += len(frames)
            size = config.chunk_frames
            yield torch.cat(frames)

    def utterance(
        self,
        text: str,
        *,
        speaker: int,
        context: Sequence[Segment] = (),
        pinned: int = 0,
        config: GenerationConfig,
        cancel: threading.Event | None = None,
        max_frames: int | None = None,
    ) -> Utterance:
        """Plan one utterance (cheap); iterate the result to generate it."""
        prompt = build_prompt(
            self.tokenizer,
            text=text,
            speaker=speaker,
            context=context,
            pinned=pinned,
            max_frames=max_frames or config.max_frames(text),
            capacity=self.model.config.max_seq_len,
            width=self.model.config.frame_width,
        )
        return Utterance(self, prompt, config, cancel)

    # ---- Mimi ----

    def start_mimi(self) -> None:
        """Mimi stays in streaming mode (state allocated once); each utterance only resets it."""
        if not self.mimi.is_streaming:
            self.mimi.streaming_forever(1)
        self.mimi.reset_streaming()

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """(n, K) codes -> (n * 1920,) float32 PCM, continuing the streaming decoder's state.

        On CUDA, moshi replays CUDA graphs that need the same input shape on every call, and chunks
        are 1-4 frames: so one frame per call there. On the CPU a whole chunk per call is ~4x cheaper.
        Either way the chunk's PCM crosses to the host in one copy.
        """
        frames = codes.T.unsqueeze(0)  # (1, K, n)
        if not self.decode_frame_by_frame:
            return self.mimi.decode(frames)[0, 0].float().cpu().numpy()  # (1, 1, n * 1920)
        pcm = [self.mimi.decode(frames[:, :, i : i + 1]) for i in range(frames.shape[-1])]
        return torch.cat(pcm, dim=-1)[0, 0].float().cpu().numpy()

    @torch.no_grad()
    def encode(self, pcm: np.ndarray) -> torch.Tensor:
        """24 kHz float PCM -> (F, K) codes on the CPU (the voice prompt; once, at load)."""
        from moshi.utils.compile import no_cuda_graph

        pad = (-len(pcm)) % SAMPLES_PER_FRAME  # streaming encode takes whole frames only
        audio = torch.from_numpy(np.pad(pcm.astype(np.float32), (0, pad)))[None, None].to(self.device)
        self.start_mimi()
        with no_cuda_graph():  # a one-off shape: capturing a graph for it would pin that shape
            codes = self.mimi.encode(audio)  # (1, K, F)
        self.mimi.reset_streaming()
        return codes[0].T.cpu().long()


class Utterance:
    """One planned utterance: iterate for float32 PCM chunks; afterwards read stop_reason and codes."""

    def __init__(
        self, owner: CsmGenerator, prompt: Prompt, config: GenerationConfig, cancel: threading.Event | None
    ) -> None:
        self.owner = owner
        self.prompt = prompt
        self.config = config
        self.cancel = cancel
        self.stop_reason: str | None = None
        self.chunks_codes: list[torch.Tensor] = []
        self.first_chunk_s: float | None = None
        self.frames_generated = 0

    @property
    def codes(self) -> torch.Tensor:
        """(frames, K) int64 codes of the audio that was yielded."""
        k = self.owner.num_codebooks
        return torch.cat(self.chunks_codes) if self.chunks_codes else torch.zeros(0, k, dtype=torch.long)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._run()

    @torch.no_grad()  # on a generator function torch scopes this to each step, not to the consumer
    def _run(self) -> Iterator[np.ndarray]:
        owner = self.owner
        owner.active = self  # a newer utterance takes over the caches; this one then stops
        try:
            owner.model.reset_caches()
            owner.start_mimi()
            yield from self._chunks(time.monotonic())
        finally:
            if owner.active is self:
                owner.active = None

    def _chunks(self, start: float) -> Iterator[np.ndarray]:
        owner, stops = self.owner, StopRules(self.config.repeat_stop_frames)
        for chunk in owner.frame_chunks(self.prompt, self.config, self.cancel):
            codes = chunk.cpu()  # the one device->host transfer of this chunk's frames
            self.frames_generated += codes.shape[0]
            keep, reason = stops.scan(codes)
            if keep:
                pcm = owner.decode(chunk[:keep])
                self.chunks_codes.append(codes[:keep])
                if self.first_chunk_s is None:
                    self.first_chunk_s = time.monotonic() - start
                yield pcm
                if owner.active is not self:  # while we were paused a newer utterance took the caches
                    self.stop_reason = "superseded"
                    return
            if reason:
                self.stop_reason = reason
                return
        cancelled = self.cancel is not None and self.cancel.is_set()
        self.stop_reason = "cancelled" if cancelled else "max_length"
