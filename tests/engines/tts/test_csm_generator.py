"""Streaming generation: chunk sizes and timing, stops, context trimming, sampling, cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from app.engines.tts.csm.generator import (
    SAMPLES_PER_FRAME,
    GenerationConfig,
    Segment,
    StopRules,
    build_prompt,
    sample_topk,
    segment_rows,
)
from app.engines.tts.csm.step import gumbel_noise, pick_code

from .conftest import varying_frame

EOS_FRAME = [0] * 32


def _segment(frames: int, text: str = "Hello there.") -> Segment:
    return Segment(speaker=4, text=text, codes=torch.ones(frames, 32, dtype=torch.long))


# ---------------------------------------------------------------- sampling


def test_topk_one_is_argmax_and_ignores_temperature() -> None:
    logits = torch.randn(3, 50)
    assert torch.equal(sample_topk(logits, topk=1, temperature=0.9), logits.argmax(-1, keepdim=True))


def test_sampling_stays_inside_the_top_k_and_follows_the_seed() -> None:
    logits = torch.randn(1, 100)
    allowed = set(torch.topk(logits, 5).indices[0].tolist())
    rng = torch.Generator().manual_seed(7)
    draws = [int(sample_topk(logits, topk=5, temperature=1.0, generator=rng)) for _ in range(300)]
    assert set(draws) <= allowed and len(set(draws)) >= 3  # random within the top 5, not stuck on one
    again = torch.Generator().manual_seed(7)
    assert draws[:20] == [int(sample_topk(logits, topk=5, temperature=1.0, generator=again)) for _ in range(20)]


# Three codes share the 2nd-best logit: top-2 keeps all of them, as Sesame's sample_topk and
# transformers' TopKLogitsWarper do (both drop only logits below the k-th), and nothing below.
TIED = torch.tensor([4.0, 1.0, 2.0, 2.0, 0.0, 2.0])


def _noise(**at: float) -> torch.Tensor:
    """Gumbel noise that is zero but at the given codes (c0..c5)."""
    noise = torch.zeros(6)
    for name, value in at.items():
        noise[int(name[1:])] = value
    return noise


@pytest.mark.parametrize(
    ("noise", "temperature", "code"),
    [
        (_noise(c4=100.0), 1.0, 0),  # below the k-th logit: no noise brings it back
        (_noise(c1=100.0, c4=100.0), 1.0, 0),
        (_noise(c2=2.5), 1.0, 2),  # each code tied at the boundary can win
        (_noise(c3=2.5), 1.0, 3),
        (_noise(c5=2.5), 1.0, 5),
        (_noise(c2=2.1, c5=2.4), 1.0, 5),
        (_noise(c5=2.5), 0.5, 0),  # logits / 0.5 = 8 vs 4 + 2.5: the noise is not scaled with them
        (_noise(c3=1.5), 2.0, 3),  # logits / 2 = 2 vs 1 + 1.5
    ],
)
def test_topk_with_fixed_noise_keeps_the_codes_tied_at_the_kth(noise, temperature: float, code: int) -> None:
    got = pick_code(TIED[None], noise[None], topk=2, temperature=temperature)
    assert got.tolist() == [[code]]


def test_topk_bound_is_per_row_and_clamped_to_the_vocabulary() -> None:
    logits = torch.stack([TIED, -TIED])  # row 1: top-2 are 0.0 (c4) and -1.0 (c1)
    noise = torch.stack([_noise(c4=100.0), _noise(c1=1.5, c2=100.0)])  # c4 and c2 fall below their row's k-th
    assert pick_code(logits, noise, topk=2, temperature=1.0).tolist() == [[0], [1]]
    assert pick_code(logits, noise, topk=50, temperature=1.0).tolist() == [[4], [2]]  # k over V keeps all


def test_sample_topk_adds_minus_log_exponential_noise_from_the_generator() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    exponential = torch.empty(4, 100).exponential_(generator=torch.Generator().manual_seed(2))
    noise = gumbel_noise((4, 100), torch.device("cpu"), torch.Generator().manual_seed(2))
    assert torch.equal(noise, -exponential.log())  # the same draws, the same elementwise ops: bit for bit
    expected = pick_code(logits, -exponential.log(), topk=7, temperature=0.8)
    assert torch.equal(sample_topk(logits, topk=7, temperature=0.8, generator=torch.Generator().manual_seed(2)),
                       expected)


def test_low_temperature_concentrates_on_the_best_code() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    rng = torch.Generator().manual_seed(0)
    cold = [int(sample_topk(logits, topk=4, temperature=0.1, generator=rng)) for _ in range(200)]
    warm = [int(sample_topk(logits, topk=4, temperature=2.0, generator=rng)) for _ in range(200)]
    assert cold.count(0) > 190 and warm.count(0) < 150


# ---------------------------------------------------------------- config, stops, prompt


def test_length_cap_grows_with_the_text_and_is_bounded() -> None:
    config = GenerationConfig(max_audio_seconds=10.0)
    short, longer = config.max_frames("Hi."), config.max_frames("word " * 10)
    assert 25 <= short < longer <= 125
    assert config.max_frames("word " * 1000) == 125
    with pytest.raises(ValueError, match="320 ms"):
        GenerationConfig(first_chunk_frames=5)


def test_stop_rules_find_eos_and_keep_the_frames_before_it() -> None:
    rules = StopRules(repeat_limit=16)
    codes = torch.tensor([varying_frame(0), varying_frame(1), EOS_FRAME, varying_frame(2)])
    assert rules.scan(codes) == (2, "eos")


def test_stop_rules_count_repeats_across_chunks() -> None:
    rules = StopRules(repeat_limit=5)
    same = torch.tensor([varying_frame(3)] * 3)
    assert rules.scan(same) == (3, None)
    assert rules.scan(same) == (0, "repeat")  # the run reaches 5 at the 2nd frame: drop the chunk's repeats
    fresh = StopRules(repeat_limit=5)
    assert fresh.scan(torch.tensor([varying_frame(i) for i in range(8)])) == (8, None)


def test_prompt_layout_text_then_audio_then_eos_frame(text_tokenizer) -> None:
    prompt = build_prompt(text_tokenizer, text="How are you?", speaker=4, context=[_segment(3)], pinned=0,
                          max_frames=10, capacity=256, width=33)
    context_text = len(text_tokenizer.encode_turn(4, "Hello there."))
    target_text = len(text_tokenizer.encode_turn(4, "How are you?"))
    assert prompt.tokens.shape == (context_text + 4 + target_text, 33)
    audio = slice(context_text, context_text + 4)
    assert prompt.mask[audio, :32].all() and not prompt.mask[audio, 32].any()
    assert (prompt.tokens[context_text + 3] == 0).all()  # the EOS frame closing the context audio
    assert prompt.mask[: context_text, 32].all() and not prompt.mask[: context_text, :32].any()
    assert prompt.tokens[-1, 32] == text_tokenizer.eos_id and prompt.segments_used == 1


def test_trimming_drops_oldest_unpinned_then_pinned(text_tokenizer) -> None:
    pinned, old, new = _segment(30, "voice prompt"), _segment(30, "old"), _segment(30, "new")
    kwargs = {"text": "Now.", "speaker": 4, "pinned": 1, "max_frames": 20, "width": 33}
    roomy = build_prompt(text_tokenizer, context=[pinned, old, new], capacity=256, **kwargs)
    assert roomy.segments_used == 3
    rows = {s.text: segment_rows(text_tokenizer, s, 33)[0].shape[0] for s in (pinned, old, new)}
    # room for everything but the "old" segment (and one position less than all three need)
    capacity = roomy.tokens.shape[0] + roomy.max_frames - rows["old"]
    tight = build_prompt(text_tokenizer, context=[pinned, old, new], capacity=capacity, **kwargs)
    assert tight.segments_used == 2 and tight.tokens.shape[0] + tight.max_frames == capacity
    kept_text = text_tokenizer.tokenizer.decode(tight.tokens[:, 32][tight.mask[:, 32]].tolist())
    assert "voice prompt" in kept_text and "new" in kept_text and "old" not in kept_text
    tiny = build_prompt(text_tokenizer, context=[pinned, old, new], capacity=40, **kwargs)
    assert tiny.segments_used == 0 and tiny.tokens.shape[0] + tiny.max_frames <= 40


@pytest.mark.parametrize("capacity", [16, 24, 64, 100])
def test_prompt_plus_reply_always_fits_the_cache(text_tokenizer, capacity: int) -> None:
    prompt = build_prompt(text_tokenizer, text="The quick brown fox jumps over the lazy dog. " * 3,
                          speaker=0, context=[_segment(40), _segment(5)], pinned=1, max_frames=50,
                          capacity=capacity, width=33)
    assert prompt.max_frames >= 1
    assert prompt.tokens.shape[0] + prompt.max_frames <= capacity
    assert prompt.tokens[-1, 32] == text_tokenizer.eos_id  # a cut text still ends its turn


# ---------------------------------------------------------------- streaming with the tiny model + Mimi


@pytest.mark.parametrize("first", [1, 2, 4])
def test_first_chunk_comes_after_first_chunk_frames(make_generator, first: int) -> None:
    generator = make_generator()
    config = GenerationConfig(first_chunk_frames=first, chunk_frames=3)
    calls = {"n": 0}
    real_step = generator.generate_frame

    def counting_step(*args):
        calls["n"] += 1
        return real_step(*args)

    generator.generate_frame = counting_step
    utterance = generator.utterance("Hello there.", speaker=4, config=config, max_frames=8)
    stream = iter(utterance)
    chunk = next(stream)
    assert calls["n"] == first  # audio leaves after `first` frames, not at the end
    assert chunk.shape == (first * SAMPLES_PER_FRAME,) and chunk.dtype.name == "float32"
    rest = list(stream)
    assert [len(c) // SAMPLES_PER_FRAME for c in rest][:1] == [min(3, 8 - first)]
    assert sum(len(c) for c in [chunk, *rest]) == utterance.codes.shape[0] * SAMPLES_PER_FRAME
    assert utterance.stop_reason in ("max_length", "repeat", "eos") and utterance.codes.shape[1] == 32


def test_max_length_stop_with_the_real_tiny_model(make_generator, fast_config) -> None:
    generator = make_generator(seed=1)
    utterance = generator.utterance("Hi.", speaker=4, config=fast_config, max_frames=7)
    chunks = list(utterance)
    assert [len(c) // SAMPLES_PER_FRAME for c in chunks] == [2, 4, 1]
    assert utterance.stop_reason == "max_length" and utterance.frames_generated == 7
    assert all(abs(c).max() > 0 for c in chunks)  # Mimi made sound, not zeros


def test_eos_frame_stops_and_is_not_spoken(make_generator, fast_config, scripted) -> None:
    generator = make_generator()
    generator.generate_frame = scripted([varying_frame(i) for i in range(5)] + [EOS_FRAME] + [varying_frame(9)] * 9)
    utterance = generator.utterance("Hello.", speaker=4, config=fast_config, max_frames=30)
    chunks = list(utterance)
    assert utterance.stop_reason == "eos"
    assert sum(len(c) for c in chunks) == 5 * SAMPLES_PER_FRAME
    assert utterance.codes.tolist() == [varying_frame(i) for i in range(5)]
    assert generator.generate_frame.calls <= 6 + fast_config.chunk_frames  # stops within one chunk


def test_eos_as_the_very_first_frame_ends_with_nothing(make_generator, fast_config, scripted) -> None:
    generator = make_generator()
    generator.generate_frame = scripted(lambda i: EOS_FRAME)
    utterance = generator.utterance("Hello.", speaker=4, config=fast_config, max_frames=200)
    assert list(utterance) == []  # the original project hung here
    assert utterance.stop_reason == "eos" and utterance.codes.shape == (0, 32)
    assert generator.generate_frame.calls == fast_config.first_chunk_frames


def test_a_run_of_identical_frames_stops(make_generator, scripted) -> None:
    generator = make_generator()
    config = GenerationConfig(first_chunk_frames=2, chunk_frames=4, repeat_stop_frames=6)
    frames = [varying_frame(i) for i in range(4)] + [varying_frame(50)] * 100
    generator.generate_frame = scripted(frames)
    utterance = generator.utterance("Hello.", speaker=4, config=config, max_frames=100)
    list(utterance)
    assert utterance.stop_reason == "repeat"
    assert generator.generate_frame.calls <= 4 + 6 + 4
    assert utterance.codes.shape[0] <= 4 + 6 and utterance.codes.tolist()[:4] == frames[:4]


def test_cancel_mid_utterance_stops_quickly(make_generator, fast_config, scripted) -> None:
    generator = make_generator()
    generator.generate_frame = scripted(varying_frame)
    cancel = threading.Event()
    utterance = generator.utterance("Hello.", speaker=4, config=fast_config, cancel=cancel, max_frames=200)
    stream = iter(utterance)
    next(stream)
    cancel.set()
    assert list(stream) == []
    assert utterance.stop_reason == "cancelled"
    assert generator.generate_frame.calls == fast_config.first_chunk_frames  # not one frame more


def test_cancel_between_frames_of_a_chunk(make_generator, fast_config, scripted) -> None:
    generator = make_generator()
    cancel = threading.Event()
    inner = scripted(varying_frame)

    def step(*args):
        if inner.calls == 3:
            cancel.set()  # the user interrupts while frame 4 is being made
        return inner(*args)

    generator.generate_frame = step
    utterance = generator.utterance("Hello.", speaker=4, config=fast_config, cancel=cancel, max_frames=200)
    chunks = list(utterance)
    assert len(chunks) == 1 and utterance.stop_reason == "cancelled" and inner.calls == 4


def test_a_new_utterance_supersedes_an_unfinished_one(make_generator, fast_config, scripted) -> None:
    generator = make_generator()
    generator.generate_frame = scripted(varying_frame)
    first = iter(generator.utterance("One.", speaker=4, config=fast_config, max_frames=20))
    next(first)
    second_utterance = generator.utterance("Two.", speaker=4, config=fast_config, max_frames=6)
    second = iter(second_utterance)
    next(second)
    calls = generator.generate_frame.calls
    assert list(first) == []  # the abandoned stream ends ...
    assert generator.generate_frame.calls == calls  # ... without one more step on the new caches
    assert sum(len(c) for c in second) == 4 * SAMPLES_PER_FRAME
    assert second_utterance.stop_reason == "max_length" and second_utterance.codes.shape[0] == 6


def test_a_huge_context_never_overflows_the_kv_cache(make_generator, fast_config) -> None:
    generator = make_generator(max_seq_len=48)
    context = [_segment(30, "a long earlier reply"), _segment(30, "another one")]
    utterance = generator.utterance("The quick brown fox jumps over the lazy dog, twice over.", speaker=4,
                                    context=context, pinned=1, config=fast_config, max_frames=40)
    chunks = list(utterance)  # would raise (cache index / RoPE table) if the prompt did not fit
    assert utterance.prompt.tokens.shape[0] + utterance.prompt.max_frames <= 48
    assert utterance.stop_reason in ("max_length", "repeat", "eos") and chunks


def test_mimi_encode_gives_whole_frames_of_32_codes(make_generator) -> None:
    import numpy as np

    generator = make_generator()
    t = np.arange(24_000) / 24_000
    codes = generator.encode((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    assert codes.shape == (13, 32) and codes.dtype == torch.long  # 1 s -> 12.5 frames, padded up
    assert int(codes.max()) < 2048


def test_streamed_decoding_equals_one_shot_decoding_of_all_frames(make_generator, mimi) -> None:
    """Chunk by chunk in streaming mode, as an utterance is played (whole chunks on the CPU, one frame
    per call on CUDA), Mimi must give the samples of decoding the whole utterance in one pass: a
    streaming state lost, reset or double-counted between chunks would click or drift here."""
    import numpy as np
    from moshi.models import loaders

    codes = torch.randint(0, 2048, (11, 32), generator=torch.Generator().manual_seed(3))
    twin = loaders.get_mimi(None, device="cpu", num_codebooks=32)  # never streaming: one pass
    twin.load_state_dict(mimi.state_dict())
    generator = make_generator()
    chunks = [(0, 2), (2, 6), (6, 10), (10, 11)]  # first_chunk_frames=2, chunk_frames=4, a short last one
    with torch.no_grad():
        whole = twin.decode(codes.T[None])[0, 0].numpy()  # (1, K, n) -> (n * 1920,)
        for frame_by_frame in (False, True):
            generator.decode_frame_by_frame = frame_by_frame
            generator.start_mimi()
            streamed = np.concatenate([generator.decode(codes[a:b]) for a, b in chunks])
            assert streamed.shape == whole.shape == (11 * SAMPLES_PER_FRAME,)
            np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-6)
    assert np.abs(whole).max() > 1e-2  # sound, so the tolerance is tight by comparison


def test_the_frame_step_never_reads_the_device(make_generator, fast_config, monkeypatch) -> None:
    """No .item()/bool()/.cpu() inside a frame: on a GPU each would stall the launch queue (STYLE habit 4)."""
    generator = make_generator()
    prompt = generator.utterance("Hello there.", speaker=4, config=fast_config, max_frames=3).prompt
    reads: list[str] = []

    def counted(name: str):
        real = getattr(torch.Tensor, name)
        return lambda self, *args, **kwargs: reads.append(name) or real(self, *args, **kwargs)

    for name in ("__bool__", "item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    with torch.no_grad():
        generator.model.reset_caches()
        chunks = list(generator.frame_chunks(prompt, fast_config, cancel=None))
    monkeypatch.undo()
    assert sum(c.shape[0] for c in chunks) == 3
    assert reads == []
