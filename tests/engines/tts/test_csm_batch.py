"""Batched CSM generation: every row of a batch gives the codes and logits of its reply made alone.

fp32 tiny random model on the CPU. Rows differ in text, speaker and context (so in prompt length);
one joins midway, one stops early (its slot is freed, the highest row moves into it, and another
reply takes the slot that frees). Greedy codes must be exactly equal; logits within 1e-4: the
batched step computes the same sums over other matmul shapes, so only float32 rounding
(~1e-6 here) may differ.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgspec
import pytest
import torch

from app.engines.tts.csm.batch import BatchRow, CsmBatch
from app.engines.tts.csm.batch_step import step_size
from app.engines.tts.csm.generator import CsmGenerator, GenerationConfig, Prompt, Segment
from app.engines.tts.csm.model import CsmModel, CsmModelConfig
from app.engines.tts.csm.step import StepOutput

from .conftest import tiny_model, varying_frame

GREEDY = GenerationConfig(topk=1, first_chunk_frames=2, chunk_frames=4)
SAMPLED = GenerationConfig(topk=50, temperature=0.9, first_chunk_frames=2, chunk_frames=4)
SEED = 3  # the weights' seed
K = 32


class Logits:
    """Records the logits every step call returned, with which row each slot held at that call."""

    def __init__(self) -> None:
        self.backbone: list[tuple[torch.Tensor, dict[int, object]]] = []
        self.decoder: list[tuple[torch.Tensor, dict[int, object]]] = []

    def wrap(self, step: Callable[..., StepOutput], into: list, owners: Callable[[], dict[int, object]]):
        def record(*args) -> StepOutput:
            code, logits = step(*args)
            into.append((logits.clone(), owners()))
            return code, logits

        return record

    def of(self, owner: object, which: str) -> torch.Tensor:
        """(calls, V) logits of one row, in call order."""
        calls = getattr(self, which)
        return torch.stack([logits[slot] for logits, owners in calls for slot, o in owners.items() if o is owner])


@pytest.fixture(scope="module")
def solo(text_tokenizer) -> CsmGenerator:
    return CsmGenerator(tiny_model(SEED), text_tokenizer, mimi=object(), seed=0)  # frames only: no Mimi


def _batch(slots: int = 4) -> CsmBatch:
    model = tiny_model(SEED)  # the same weights as `solo`
    model.setup_caches(torch.float32, slots=slots)
    return CsmBatch(model, sampled_vocab=model.config.audio_vocab_size)


def _context() -> list[Segment]:
    codes = torch.randint(1, 60, (9, K), generator=torch.Generator().manual_seed(4))
    return [Segment(speaker=4, text="Hello there, how are you today?", codes=codes)]


def _prompt(solo: CsmGenerator, text: str, speaker: int, frames: int, context=()) -> Prompt:
    return solo.utterance(text, speaker=speaker, context=list(context), pinned=len(context), config=GREEDY,
                          max_frames=frames).prompt


def _alone(solo: CsmGenerator, prompt: Prompt, config: GenerationConfig, seed: int):
    """(frames, K) codes and the (frames, V) backbone and (frames * 31, V) decoder logits, made alone."""
    step, seen = solo.step, Logits()
    saved = step.backbone, step.backbone_step, step.decoder, step.decoder_step
    backbone = seen.wrap(step.backbone_step, seen.backbone, lambda: {0: solo})
    decoder = seen.wrap(step.decoder_step, seen.decoder, lambda: {0: solo})
    step.backbone = step.backbone_step = backbone
    step.decoder = step.decoder_step = decoder
    solo.rng.manual_seed(seed)
    try:
        with torch.no_grad():
            solo.model.reset_caches()
            codes = torch.cat(list(solo.frame_chunks(prompt, config, cancel=None))).cpu()
    finally:
        step.backbone, step.backbone_step, step.decoder, step.decoder_step = saved
    return codes, seen.of(solo, "backbone"), seen.of(solo, "decoder")


def _recording(batch: CsmBatch) -> Logits:
    seen = Logits()

    def owners() -> dict[int, object]:
        return {row.slot: row for row in batch.live()}

    step = batch.step
    step.backbone = step.backbone_step = seen.wrap(step.backbone_step, seen.backbone, owners)
    step.decoder = step.decoder_step = seen.wrap(step.decoder_step, seen.decoder, owners)
    return seen


def _run(batch: CsmBatch, joins: dict[int, list[tuple[Prompt, GenerationConfig, int]]]) -> list[BatchRow]:
    """Advance until every row has finished; before frame n, admit joins[n] (prompt, config, seed)."""
    rows: list[BatchRow] = []
    frame = 0
    while batch.live() or any(n >= frame for n in joins):
        for prompt, config, seed in joins.get(frame, []):
            rows.append(batch.join(prompt, config, rng=torch.Generator().manual_seed(seed)))
        batch.advance()
        frame += 1
    return rows


def test_rows_joining_and_leaving_give_each_reply_alone(solo) -> None:
    a = _prompt(solo, "Hi.", speaker=4, frames=5)  # stops early: its slot frees after frame 5
    b = _prompt(solo, "I can help you plan a trip.", speaker=0, frames=12, context=_context())
    c = _prompt(solo, "The quick brown fox.", speaker=2, frames=9)  # joins midway, into slot 2
    d = _prompt(solo, "Tell me more.", speaker=4, frames=6)  # joins the slot the batch compacted
    assert len({p.tokens.shape[0] for p in (a, b, c, d)}) == 4  # four different prompt lengths
    batch = _batch()
    seen = _recording(batch)
    sizes: list[int] = []
    batch.advance = _sizes_of(batch.advance, batch, sizes)
    rows = _run(batch, {0: [(a, GREEDY, 0), (b, GREEDY, 0)], 3: [(c, GREEDY, 0)], 7: [(d, GREEDY, 0)]})
    assert sizes[:3] == [2, 2, 2] and sizes[3] == 4 and 2 in sizes[5:7]  # a left: c moved down into slot 0
    for row, prompt in zip(rows, (a, b, c, d)):
        codes, backbone, decoder = _alone(solo, prompt, GREEDY, seed=0)
        assert row.stop_reason == "max_length" and codes.shape == (prompt.max_frames, K)
        assert len({tuple(f.tolist()) for f in codes}) > codes.shape[0] // 2  # real, varying frames
        assert torch.equal(row.codes, codes)
        torch.testing.assert_close(seen.of(row, "backbone"), backbone, atol=1e-4, rtol=0)
        torch.testing.assert_close(seen.of(row, "decoder"), decoder, atol=1e-4, rtol=0)
    assert torch.cat([x for x, _ in seen.decoder]).std() > 0.1  # logits vary: the margin means something


def _sizes_of(advance, batch: CsmBatch, sizes: list[int]):
    def recorded():
        if batch.live():
            sizes.append(batch.size)
        return advance()

    return recorded


def test_each_row_samples_with_its_own_noise(solo) -> None:
    """Top-k sampling: each row draws what its own generator would draw alone. Exact codes: the noise
    is the same draw, and a code could only flip if two noisy scores tied within ~1e-6."""
    prompt = _prompt(solo, "Hello there.", speaker=4, frames=6)
    other = _prompt(solo, "How are you today?", speaker=1, frames=6)
    rows = _run(_batch(), {0: [(prompt, SAMPLED, 11), (prompt, SAMPLED, 12), (other, SAMPLED, 13)]})
    for row, seed in zip(rows, (11, 12, 13)):
        assert torch.equal(row.codes, _alone(solo, row.prompt, SAMPLED, seed=seed)[0])
    assert not torch.equal(rows[0].codes, rows[1].codes)  # same prompt, own noise: another reply


def _scripted(batch: CsmBatch, frames_of: dict[int, Callable[[int], list[int]]]) -> None:
    """Replace the model step: the row that joined n-th gets frames_of[n](its frame index)."""
    joined = list(batch.rows)

    def frame(tokens, mask, positions, gumbel, *, topk, temperature) -> torch.Tensor:
        out = torch.ones(tokens.shape[0], K, dtype=torch.long)
        for row in batch.live():
            out[row.slot] = torch.tensor(frames_of[joined.index(row)](row.frames))
        return out

    batch.step.batch_frame = frame


def test_each_row_has_its_own_stop_rules(solo) -> None:
    batch = _batch()
    prompt = _prompt(solo, "Hello.", speaker=4, frames=30)
    config = GenerationConfig(first_chunk_frames=2, chunk_frames=4, repeat_stop_frames=5)
    rows = [batch.join(prompt, config, rng=torch.Generator()) for _ in range(3)]
    _scripted(batch, {0: lambda i: [0] * K if i == 6 else varying_frame(i),  # EOS at frame 7
                      1: lambda i: varying_frame(i if i < 3 else 50),  # stuck from frame 4 on
                      2: varying_frame})  # runs to its length cap
    chunks: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while batch.live():
        for row, codes in batch.advance():
            chunks[rows.index(row)].append(codes.shape[0])
    assert (rows[0].stop_reason, rows[0].codes.tolist()) == ("eos", [varying_frame(i) for i in range(6)])
    assert chunks[0] == [2, 4, 0]  # the EOS frame and what followed it in its chunk are dropped
    assert rows[1].stop_reason == "repeat" and rows[1].codes.shape[0] <= 3 + 5
    assert rows[2].stop_reason == "max_length" and rows[2].codes.tolist() == [varying_frame(i) for i in range(30)]


def test_a_cancelled_row_leaves_before_the_next_frame(solo) -> None:
    batch = _batch()
    prompt = _prompt(solo, "Hello.", speaker=4, frames=10)
    cancel = threading.Event()
    kept = batch.join(prompt, GREEDY, rng=torch.Generator())
    gone = batch.join(prompt, GREEDY, rng=torch.Generator(), cancel=cancel)
    _scripted(batch, {0: varying_frame, 1: varying_frame})
    batch.advance()
    cancel.set()
    batch.advance()
    assert gone.stop_reason == "cancelled" and gone.frames == 1 and gone.slot == -1
    assert kept.frames == 2 and batch.size == 1 and batch.free_slots() == 3


def test_static_sizes_pad_the_batch() -> None:
    assert [step_size(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="largest"):
        step_size(9)
    assert _batch(slots=4).sizes == (1, 2, 4) and _batch(slots=3).sizes == (1, 2, 3)


def test_rows_of_one_batch_sample_alike(solo) -> None:
    batch = _batch()
    prompt = _prompt(solo, "Hello.", speaker=4, frames=4)
    batch.join(prompt, GREEDY, rng=torch.Generator())
    with pytest.raises(ValueError, match="sample alike"):
        batch.join(prompt, SAMPLED, rng=torch.Generator())


def test_the_single_reply_path_refuses_slot_caches() -> None:
    model = tiny_model(SEED)
    with pytest.raises(ValueError, match="slot caches"):
        CsmBatch(model, sampled_vocab=64)


def _one_layer(slots: int) -> CsmModel:
    """The tiny model with one layer per stack (every op of the step, half the compile time)."""
    torch.manual_seed(SEED)
    tiny = CsmModelConfig.tiny()
    config = msgspec.structs.replace(tiny, backbone=msgspec.structs.replace(tiny.backbone, num_layers=1),
                                     decoder=msgspec.structs.replace(tiny.decoder, num_layers=1))
    model = CsmModel(config).prepare(device="cpu", dtype=torch.float32)
    model.setup_caches(torch.float32, slots=slots)
    return model


def test_the_compiled_batch_step_keeps_one_graph_per_size(solo) -> None:
    """Compiled (inductor on the CPU; CUDA graphs on a GPU), warmed at sizes 1 and 2: a reply alone,
    then a second joining, then the first leaving, run without a recompile and give the eager codes."""
    a = _prompt(solo, "Hi.", speaker=4, frames=4)
    b = _prompt(solo, "I can help you plan a trip.", speaker=0, frames=7)
    joins = {0: [(a, GREEDY, 0)], 2: [(b, GREEDY, 0)]}
    eager = [row.codes for row in _run(CsmBatch(_one_layer(2), sampled_vocab=64), joins)]
    batch = CsmBatch(_one_layer(2), sampled_vocab=64)
    assert batch.sizes == (1, 2)
    batch.step.compile("default")
    batch.step.warm_sizes(batch.sizes, topk=GREEDY.topk, temperature=GREEDY.temperature)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = [row.codes for row in _run(batch, joins)]
    assert batch.step.compiled  # no silent fallback to eager
    assert [c.shape[0] for c in eager] == [4, 7]
    for got, expected in zip(compiled, eager):
        assert torch.equal(got, expected)
