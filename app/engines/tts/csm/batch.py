"""Continuous batching of CSM replies: rows join and leave between frames, each with its own stops.

A CsmBatch holds up to `slots` replies, one per KV cache slot. `join` prefills a reply's prompt
(all but its last row) into the lowest free slot; from then on every `advance` runs ONE batched frame
step (batch_step.py) for all rows. Each row keeps its own sampler noise (its torch.Generator draws
the same (K, V) Gumbel noise a frame that the one-at-a-time generator draws), its own chunking
(first_chunk_frames, then chunk_frames) and its own stop rules, read once per chunk on the CPU.
A row that stops or is cancelled frees its slot; the highest row then moves into it, so the step
runs at the smallest static batch size that holds the rows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from app.engines.tts.csm.batch_step import STEP_SIZES, BatchFrameStep, step_size
from app.engines.tts.csm.generator import GenerationConfig, Prompt, StopRules
from app.engines.tts.csm.model import CsmModel
from app.engines.tts.csm.step import gumbel_noise


@dataclass(eq=False)
class BatchRow:
    """One reply in the batch: its prompt and noise, and the frames it has made and kept."""

    prompt: Prompt
    config: GenerationConfig
    rng: torch.Generator
    cancel: threading.Event | None = None
    slot: int = -1
    frames: int = 0  # generated so far (kept or not)
    chunk: int = 0  # frames in the chunk under way
    pending: list[torch.Tensor] = field(default_factory=list)  # (1, K) device frames of that chunk
    kept: list[torch.Tensor] = field(default_factory=list)  # (n, K) CPU chunks that passed the stops
    stop_reason: str | None = None
    stops: StopRules = field(init=False)

    def __post_init__(self) -> None:
        self.stops = StopRules(self.config.repeat_stop_frames)
        self.chunk = self.config.first_chunk_frames

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    @property
    def codes(self) -> torch.Tensor:
        """(frames, K) int64 codes kept so far."""
        return torch.cat(self.kept) if self.kept else torch.zeros(0, self.prompt.tokens.shape[1] - 1, dtype=torch.long)

    def chunk_closed(self) -> bool:
        return len(self.pending) >= self.chunk or self.frames >= self.prompt.max_frames

    def close_chunk(self) -> torch.Tensor:
        """The chunk's codes to the CPU (one transfer), through the stop rules: the (n, K) codes kept."""
        codes = torch.cat(self.pending).cpu()
        self.pending.clear()
        keep, reason = self.stops.scan(codes)
        if keep:
            self.kept.append(codes[:keep])
        if reason is None and self.frames >= self.prompt.max_frames:
            reason = "max_length"
        self.stop_reason = reason
        self.chunk = self.config.chunk_frames
        return codes[:keep]


class CsmBatch:
    """Up to `model.slots` replies advancing together, one frame step per frame for all of them."""

    def __init__(self, model: CsmModel, sampled_vocab: int, *, sizes: tuple[int, ...] = STEP_SIZES) -> None:
        self.step = BatchFrameStep(model, sampled_vocab)
        self.model, self.device = model, self.step.device
        slots = model.slots or 0
        self.sizes = tuple(s for s in sizes if s < slots) + (slots,)  # a full batch is always a size
        self.rows: list[BatchRow | None] = [None] * slots
        width = model.config.frame_width
        # Each row's next backbone input, rewritten in place after every frame.
        self.tokens = torch.zeros(slots, 1, width, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(slots, 1, width, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, 1, dtype=torch.long, device=self.device)  # idle rows stay at 0
        self.audio_mask = torch.ones(width, dtype=torch.bool, device=self.device)
        self.audio_mask[-1] = False
        self.sampling: tuple[int, float] | None = None  # (topk, temperature): one per step call

    @property
    def size(self) -> int:
        """The static batch size the next frame runs at (0: no rows)."""
        used = max((s + 1 for s, row in enumerate(self.rows) if row is not None), default=0)
        return step_size(used, self.sizes) if used else 0

    def live(self) -> list[BatchRow]:
        return [row for row in self.rows if row is not None]

    def free_slots(self) -> int:
        return self.rows.count(None)

    @torch.no_grad()
    def join(self, prompt: Prompt, config: GenerationConfig, *, rng: torch.Generator,
             cancel: threading.Event | None = None) -> BatchRow:
        """Admit a reply between frames: its prompt into the lowest free slot; its first frame comes
        from the next `advance`, which reads the prompt's last row at its own position."""
        sampling = (config.topk, config.temperature)
        if self.sampling is not None and self.live() and sampling != self.sampling:
            raise ValueError(f"rows of one batch sample alike: {self.sampling}, not {sampling}")
        self.sampling = sampling
        slot = self.rows.index(None)  # ValueError when full: the scheduler checks free_slots()
        tokens, mask = prompt.tokens.to(self.device), prompt.mask.to(self.device)
        if tokens.shape[0] > 1:
            self.step.prefill(slot, tokens[None, :-1], mask[None, :-1])
        self.tokens[slot, 0], self.mask[slot, 0] = tokens[-1], mask[-1]
        self.positions[slot, 0], self.active[slot, 0] = tokens.shape[0] - 1, 1
        row = BatchRow(prompt=prompt, config=config, rng=rng, cancel=cancel, slot=slot)
        self.rows[slot] = row
        return row

    @torch.no_grad()
    def advance(self) -> list[tuple[BatchRow, torch.Tensor]]:
        """One frame for every row. Returns (row, its kept (n, K) CPU codes) for each row whose chunk
        closed (n may be 0 when it stopped); rows that stopped or were cancelled have left."""
        for row in self.live():
            if row.cancel is not None and row.cancel.is_set():
                row.stop_reason = "cancelled"
                self._leave(row)
        size = self.size
        if not size:
            return []
        topk, temperature = self.sampling or (1, 0.0)
        codes = self.step.batch_frame(self.tokens[:size], self.mask[:size], self.positions[:size], self._noise(size),
                                topk=topk, temperature=temperature)  # (size, K)
        self._feed_back(codes, size)
        closed = []
        for row in self.live():
            row.pending.append(codes[row.slot : row.slot + 1])
            row.frames += 1
            if row.chunk_closed():
                closed.append((row, row.close_chunk()))
        for row, _ in closed:
            if row.finished:
                self._leave(row)
        return closed

    def _noise(self, size: int) -> torch.Tensor:
        """(size, K, V) Gumbel noise: each row's own draw, as its generator alone would make it."""
        k, vocab = len(self.step.codebooks), self.step.vocab
        noise = torch.zeros(size, k, vocab, device=self.device)
        for row in self.live():
            noise[row.slot] = gumbel_noise((k, vocab), self.device, row.rng)
        return noise

    def _feed_back(self, codes: torch.Tensor, size: int) -> None:
        """Each row's frame becomes its next input (audio columns only), one position on."""
        self.tokens[:size, 0, :-1] = codes
        self.tokens[:size, 0, -1] = 0
        self.mask[:size, 0] = self.audio_mask
        self.positions[:size].add_(self.active[:size])

    def _leave(self, row: BatchRow) -> None:
        """Free the row's slot, and move the highest row down into it (the batch stays compact)."""
        slot = row.slot
        self.rows[slot], row.slot = None, -1
        self.active[slot, 0], self.positions[slot, 0] = 0, 0
        top = max((s for s, other in enumerate(self.rows) if other is not None), default=-1)
        if top <= slot:
            return
        moved = self.rows[top]
        self.model.move_slot(top, slot)
        for buffer in (self.tokens, self.mask, self.positions, self.active):
            buffer[slot] = buffer[top]
        self.active[top, 0], self.positions[top, 0] = 0, 0
        self.rows[slot], self.rows[top], moved.slot = moved, None, slot
