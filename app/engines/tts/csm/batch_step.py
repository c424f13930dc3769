"""The CSM frame step for B replies at once: each row at its own backbone position, over its own cache slot.

The model's caches are SlotKVCaches (CsmModel.setup_caches(dtype, slots=N)). Row r of a step is slot r:
the backbone reads row r's tokens at row r's position and attends only to slot r (the causal mask of
that position), so replies with different prompts, speakers and lengths share one matmul per layer.
The depth decoder lasts one frame, and every row is at the same codebook, so its positions are shared.

A step runs at a static batch size (1, 2, 4 or 8): the rows a scheduler has not filled run idle at
position 0 of their own free slot, and their codes are thrown away. A static size is what lets a
compiled step keep one graph (one CUDA graph on a GPU) per size instead of recompiling per count.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from app.engines.tts.csm.model import CsmModel
from app.engines.tts.csm.step import FrameStep, StepOutput, pick_code

STEP_SIZES = (1, 2, 4, 8)


def step_size(rows: int, sizes: Sequence[int] = STEP_SIZES) -> int:
    """The smallest static batch size that holds `rows` rows (the rest of it runs idle)."""
    for size in sizes:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows do not fit the largest batch size {max(sizes)}")


class BatchFrameStep(FrameStep):
    """The two step functions of one batched frame, and the prefill that puts a prompt into a slot.

    FrameStep's compiling and its fallback serve as they are: a compiled step keeps one graph per
    batch size (the shapes differ), recorded for every size in `warm`.
    """

    def __init__(self, model: CsmModel, sampled_vocab: int) -> None:
        if model.slots is None:
            raise ValueError("the batched step needs slot caches: model.setup_caches(dtype, slots=N)")
        super().__init__(model, sampled_vocab)
        self._static: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def static_inputs(self, size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """For a batch size: the (b, 1) row index 0..b-1 and the (b, 1) decoder positions 0..K-1.

        Made once per size and then reused, so a compiled step always sees the same tensors.
        """
        if size not in self._static:
            index = torch.arange(size, device=self.device)[:, None]
            positions = [torch.full((size, 1), i, device=self.device) for i in range(len(self.codebooks))]
            self._static[size] = (index, positions)
        return self._static[size]

    # ---- the backbone step (the decoder step is FrameStep's: its shapes hold for b rows) ----

    def backbone_step(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, gumbel: torch.Tensor,
        topk: int, temperature: float,
    ) -> StepOutput:
        """(b, 1, K+1) rows at (b, 1) positions -> (b, 1) codes of codebook 0 and their (b, V) logits;
        the decoder's position 0 then holds each row's backbone state."""
        model = self.model
        hidden = model.backbone_hidden(model.embed_frames(tokens, mask), positions)[:, -1]  # (b, D)
        logits = model.codebook0_logits(hidden)  # (b, V)
        code = pick_code(logits[..., : self.vocab], gumbel, topk=topk, temperature=temperature)
        # No decoder reset: position i reads only positions <= i, all rewritten in this frame.
        model.decoder_hidden(hidden.unsqueeze(1), model.decoder_cursor.positions)
        return code, logits

    # ---- one frame, and a prompt into a slot ----

    def batch_frame(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, gumbel: torch.Tensor, *,
        topk: int, temperature: float,
    ) -> torch.Tensor:
        """One frame of b rows (slots 0..b-1): (b, 1, K+1) at (b, 1) positions, (b, K, V) noise -> (b, K) codes."""
        size, k = tokens.shape[0], len(self.codebooks)
        index, decoder_positions = self.static_inputs(size)
        rows, cursors = slice(0, size), (self.model.backbone_cursor, self.model.decoder_cursor)
        cursors[0].point(rows, index, positions)
        cursors[1].point(rows, index, decoder_positions[0])
        codes = torch.empty(size, k, dtype=torch.long, device=self.device)
        # Copy each code out at once: a CUDA graph's outputs are overwritten by its next replay.
        codes[:, :1] = self.backbone(tokens, mask, positions, gumbel[:, 0], topk, temperature)[0]
        for i in range(1, k):
            cursors[1].point(rows, index, decoder_positions[i])
            codes[:, i : i + 1] = self.decoder(codes[:, i - 1 : i], decoder_positions[i], self.codebooks[i],
                                               gumbel[:, i], topk, temperature)[0]
        return codes

    def prefill(self, slot: int, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """(1, S, K+1) prompt rows -> slot `slot`'s cache at positions 0..S-1 (batch 1, eager)."""
        positions = torch.arange(tokens.shape[1], device=self.device)[None]  # (1, S)
        self.model.backbone_cursor.point(slice(slot, slot + 1), self.static_inputs(1)[0], positions)
        self.model.backbone_hidden(self.model.embed_frames(tokens, mask), positions)

    @torch.no_grad()
    def warm_sizes(self, sizes: Sequence[int], *, topk: int, temperature: float, frames: int = 3) -> float:
        """Compile (or load) and record the step for every batch size: idle frames at the first
        positions of the slots (before any reply holds one). Returns the seconds it took."""
        start = time.perf_counter()
        width, k = self.model.config.frame_width, len(self.codebooks)
        for size in sizes:
            tokens = torch.zeros(size, 1, width, dtype=torch.long, device=self.device)
            mask = torch.ones_like(tokens, dtype=torch.bool)
            positions = torch.zeros(size, 1, dtype=torch.long, device=self.device)
            gumbel = torch.zeros(size, k, self.vocab, device=self.device)
            for _ in range(frames):  # torch.compile's CUDA graphs record on the second or third call
                self.batch_frame(tokens, mask, positions, gumbel, topk=topk, temperature=temperature)
                positions.add_(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start
