"""The CSM frame step as two static-shape functions, run eagerly or compiled (CUDA graphs on a GPU).

One frame = one backbone step (codebook 0, and the decoder primed with the backbone's state) and
K-1 decoder steps (one codebook each). After the prompt, every step has the same shapes, takes its
positions and codebook index as device tensors and samples on the device, so torch.compile can
turn each into one graph that replays without the host reading anything back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from app.engines.tts.csm.model import CsmModel

log = logging.getLogger(__name__)

StepOutput = tuple[torch.Tensor, torch.Tensor]  # (code (1, 1) int64, logits (1, V) of that code)
CompileMode = Literal["default", "reduce-overhead"]


def compile_mode(setting: Literal["auto", "on", "off"], device: torch.device) -> CompileMode | None:
    """torch.compile's mode for the setting, or None for eager. `auto` compiles on CUDA only: there
    the CUDA graphs remove the launch overhead that sets the speed; on a CPU compiling costs start-up."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    return "reduce-overhead" if device.type == "cuda" else "default"


def use_model_cache_for_inductor() -> str:
    """Point inductor's cache into the model cache folder (a Docker volume), so a restart loads the
    compiled kernels instead of compiling again. A TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    from huggingface_hub import constants

    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(constants.HF_HOME) / "torchinductor"))


def gumbel_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """-log(E), E ~ Exp(1): added to logits, argmax draws from their softmax (the Gumbel-max trick)."""
    noise = torch.empty(shape, device=device).exponential_(generator=generator)
    return noise.clamp_min_(1e-20).log_().neg_()


def pick_code(logits: torch.Tensor, gumbel: torch.Tensor, *, topk: int, temperature: float) -> torch.Tensor:
    """(B, V) logits and (B, V) Gumbel noise -> (B, 1) codes: greedy, or top-k at `temperature`."""
    logits = logits.float()
    if topk == 1 or temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    kth = torch.topk(logits, min(topk, logits.shape[-1]), dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits + gumbel).argmax(dim=-1, keepdim=True)


class FrameStep:
    """The two step functions of one frame, with their static device inputs; compiled on request.

    The compiled versions are kept beside the eager ones: the prompt (many positions) always runs
    eagerly. Only the warm-up may fall back to eager (for good, with a WARNING naming the cause): there
    a failure is one of compiling or of capturing the graphs. After it, an error in a step (out of
    memory, a device assert) is raised: the step may have half-updated the KV caches, so running it
    again eagerly would speak from a corrupted state.
    """

    def __init__(self, model: CsmModel, sampled_vocab: int) -> None:
        self.model = model
        self.vocab = sampled_vocab
        self.device = model.text_embeddings.weight.device
        k = model.config.audio_num_codebooks
        # The decoder step for codebook i reads codebook i-1's code at decoder position i.
        self.codebooks = [torch.tensor(i, device=self.device) for i in range(k)]  # 0-d: a head index
        self.positions = [torch.tensor([[i]], device=self.device) for i in range(k)]  # (1, 1)
        self.prime_position = self.positions[0]  # the backbone state sits at decoder position 0
        self.backbone: Callable[..., StepOutput] = self.backbone_step
        self.decoder: Callable[..., StepOutput] = self.decoder_step
        self.compiled = False

    # ---- the two steps (pure tensor code: this is what torch.compile sees) ----

    def backbone_step(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, gumbel: torch.Tensor,
        topk: int, temperature: float,
    ) -> StepOutput:
        """(1, S, K+1) rows at (1, S) positions -> codebook 0; the decoder cache then holds the state."""
        model = self.model
        hidden = model.backbone_hidden(model.embed_frames(tokens, mask), positions)[:, -1]  # (1, D)
        logits = model.codebook0_logits(hidden)  # (1, V)
        code = pick_code(logits[..., : self.vocab], gumbel, topk=topk, temperature=temperature)
        model.reset_decoder_cache()
        model.decoder_hidden(hidden.unsqueeze(1), self.prime_position)  # fills decoder slot 0 only
        return code, logits

    def decoder_step(
        self, previous: torch.Tensor, position: torch.Tensor, codebook: torch.Tensor, gumbel: torch.Tensor,
        topk: int, temperature: float,
    ) -> StepOutput:
        """(1, 1) code of codebook-1 at decoder `position` -> the code of `codebook` (0-d tensor)."""
        model = self.model
        logits = model.decoder_logits(model.embed_audio(codebook - 1, previous), position, codebook)
        return pick_code(logits[..., : self.vocab], gumbel, topk=topk, temperature=temperature), logits

    # ---- one frame ----

    def frame(
        self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *, topk: int, temperature: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """One frame, all on the device: (1, S, K+1) rows at (1, S) positions -> (1, K) codes."""
        k = len(self.codebooks)
        gumbel = gumbel_noise((k, self.vocab), self.device, generator)  # one draw for the whole frame
        backbone = self.backbone if tokens.shape[1] == 1 else self.backbone_step  # the prompt: eager
        codes = torch.empty(1, k, dtype=torch.long, device=self.device)
        # Copy each code out at once: a CUDA graph's outputs are overwritten by its next replay.
        codes[:, :1] = backbone(tokens, mask, positions, gumbel[:1], topk, temperature)[0]
        for i in range(1, k):
            codes[:, i : i + 1] = self.decoder(codes[:, i - 1 : i], self.positions[i], self.codebooks[i],
                                               gumbel[i : i + 1], topk, temperature)[0]
        return codes

    # ---- compiling ----

    def compile(self, mode: CompileMode) -> None:
        """Wrap both steps in torch.compile (lazy: the first call compiles; see FrameStep.warm).

        fullgraph: a graph break would split the step and, on CUDA, its graph; better to fail
        loudly here (and run eagerly) than to run a silently slower half-compiled step.
        """
        options = {"fullgraph": True, "dynamic": False, "mode": mode}
        try:
            self.backbone = torch.compile(self.backbone_step, **options)
            self.decoder = torch.compile(self.decoder_step, **options)
        except Exception as exc:  # e.g. a platform torch.compile does not support
            log.warning("csm: running the frame step eagerly: torch.compile is unavailable: %s", describe(exc))
            self.use_eager("")
            return
        self.compiled = True

    def use_eager(self, reason: str) -> None:
        if self.compiled:
            log.warning("csm: running the frame step eagerly: %s", reason)
        self.backbone, self.decoder, self.compiled = self.backbone_step, self.decoder_step, False

    @torch.no_grad()
    def warm(self, *, topk: int, temperature: float, frames: int = 3) -> float:
        """Compile (or load from the inductor cache) and, on CUDA, record the graphs: a few frames
        of one-position steps on the real caches, which it leaves reset. Returns the seconds it took.

        The one place a compiled step may fail and the voice go on eagerly: what fails here is
        compiling (no C compiler, a missing header, an unsupported op) or capturing the graphs."""
        start = time.perf_counter()
        try:
            self._warm_frames(topk=topk, temperature=temperature, frames=frames)
        except Exception as exc:
            if not self.compiled:
                raise  # the eager step itself fails: nothing to fall back to
            self.use_eager(f"torch.compile failed in the warm-up: {describe(exc)}")
        finally:
            self.model.reset_caches()  # no warm-up frame, and nothing a failed step half-wrote, is kept
        return time.perf_counter() - start

    def _warm_frames(self, *, topk: int, temperature: float, frames: int) -> None:
        width = self.model.config.frame_width
        tokens = torch.zeros(1, 1, width, dtype=torch.long, device=self.device)
        mask = torch.ones(1, 1, width, dtype=torch.bool, device=self.device)
        position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.model.reset_caches()
        for _ in range(frames):  # torch.compile's CUDA graphs record on the second or third call
            self.frame(tokens, mask, position, topk=topk, temperature=temperature, generator=None)
            position.add_(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # an error of the last replay shows here, not mid-reply


def describe(exc: BaseException) -> str:
    """One line naming what failed. torch wraps the compiler's own error (no C compiler, Python.h
    missing) in its own, whose message starts "backend='inductor' raised:": name the innermost too."""
    inner = exc
    for _ in range(8):  # torch's wrappers nest a few deep; a cycle must not hang the warm-up
        cause = getattr(inner, "inner_exception", None) or inner.__cause__
        if not isinstance(cause, BaseException):
            break
        inner = cause
    if inner is exc:
        return _first_line(exc)
    return f"{type(exc).__name__} <- {_first_line(inner)}"


def _first_line(exc: BaseException) -> str:
    """A compile error's message can run to pages; the log gets its first line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
