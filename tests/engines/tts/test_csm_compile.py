"""The compiled frame step against the eager one: same greedy codes and logits, and a safe fallback.

Tiny random weights in float32 on the CPU (inductor's C++ backend), so it runs in CI; on a GPU
the same two functions become CUDA graphs. Compiling costs ~30-60 s on 2 cores with a cold cache,
paid once here; one layer per stack (every op of the step, half the compile time of two).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import msgspec
import pytest
import torch

from app.engines.tts.csm.engine import CsmEngine
from app.engines.tts.csm.generator import CsmGenerator, GenerationConfig, Segment
from app.engines.tts.csm.model import CsmModel, CsmModelConfig
from app.engines.tts.csm.settings import CsmSettings
from app.engines.tts.csm.step import FrameStep, StepOutput, compile_mode

GREEDY = GenerationConfig(topk=1, first_chunk_frames=2, chunk_frames=4)
FRAMES = 12


def one_layer_model(seed: int, device: str = "cpu") -> CsmModel:
    """CsmModelConfig.tiny() with one layer per stack: grouped-query attention, RoPE, KV caches, 32 codebooks."""
    torch.manual_seed(seed)
    tiny = CsmModelConfig.tiny()
    config = msgspec.structs.replace(tiny, backbone=msgspec.structs.replace(tiny.backbone, num_layers=1),
                                     decoder=msgspec.structs.replace(tiny.decoder, num_layers=1))
    return CsmModel(config).prepare(device=device, dtype=torch.float32)


def _recording(step: Callable[..., StepOutput], seen: list[torch.Tensor]) -> Callable[..., StepOutput]:
    def record(*args) -> StepOutput:
        code, logits = step(*args)
        seen.append(logits.clone())
        return code, logits

    return record


def _speak(generator: CsmGenerator) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A greedy utterance after a voice context: (frames, K) codes, and the logits every one-position
    backbone step and every decoder step returned, in order."""
    step = generator.step
    backbone, decoder = step.backbone, step.decoder
    seen_backbone: list[torch.Tensor] = []
    seen_decoder: list[torch.Tensor] = []
    step.backbone, step.decoder = _recording(backbone, seen_backbone), _recording(decoder, seen_decoder)
    codes = torch.randint(1, 60, (12, 32), generator=torch.Generator().manual_seed(4))
    context = [Segment(speaker=4, text="Hello there, how are you today?", codes=codes)]
    try:
        utterance = generator.utterance("I can help you plan a trip.", speaker=4, context=context, pinned=1,
                                        config=GREEDY, max_frames=FRAMES)
        list(utterance)
    finally:
        step.backbone, step.decoder = backbone, decoder
    assert utterance.prompt.segments_used == 1 and utterance.stop_reason == "max_length"
    return utterance.codes, seen_backbone, seen_decoder


@pytest.fixture(scope="module")
def runs(text_tokenizer, mimi):
    """The same generator speaking the same greedy utterance, eagerly and then compiled."""
    generator = CsmGenerator(one_layer_model(seed=3), text_tokenizer, mimi, seed=0)
    eager = _speak(generator)
    generator.step.compile("default")
    compile_s = generator.step.warm(topk=GREEDY.topk, temperature=GREEDY.temperature)
    # The warm-up's graphs must serve real utterances as they are: a recompile (a guard on a shape or
    # stride that changes with the prompt) would cost seconds mid-reply; here it fails the test.
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _speak(generator)
    return generator, eager, compiled, compile_s


def test_compiled_step_gives_the_eager_greedy_codes(runs) -> None:
    generator, (eager_codes, *_), (compiled_codes, *_), _ = runs
    assert generator.step.compiled  # no silent fallback: the compiled functions really ran
    assert eager_codes.shape == (FRAMES, 32)
    assert len({tuple(f.tolist()) for f in eager_codes}) > FRAMES // 2  # real, varying frames
    assert torch.equal(compiled_codes, eager_codes)


def test_compiled_step_logits_match_eager_within_1e4(runs) -> None:
    _, (_, eager_backbone, eager_decoder), (_, compiled_backbone, compiled_decoder), _ = runs
    assert len(eager_backbone) == FRAMES - 1  # every frame after the prompt's went through the step
    assert len(eager_decoder) == FRAMES * 31
    assert (len(compiled_backbone), len(compiled_decoder)) == (len(eager_backbone), len(eager_decoder))
    spread = torch.stack(eager_decoder).std()
    assert spread > 0.1  # logits that differ from code to code, so the comparison means something
    for got, expected in ((compiled_backbone, eager_backbone), (compiled_decoder, eager_decoder)):
        torch.testing.assert_close(torch.cat(got), torch.cat(expected), atol=1e-4, rtol=0)


def test_a_failing_compiled_step_falls_back_to_eager_once(make_generator, caplog) -> None:
    generator = make_generator(seed=3)
    expected = torch.cat(list(generator.frame_chunks(_prompt(generator), GREEDY, cancel=None)))
    step = generator.step
    calls = {"n": 0}

    def broken(*args) -> StepOutput:
        calls["n"] += 1
        raise RuntimeError("inductor exploded\nwith a long traceback")

    step.backbone, step.decoder, step.compiled = broken, broken, True  # as if torch.compile had failed
    generator.model.reset_caches()
    with caplog.at_level(logging.WARNING, logger="app.engines.tts.csm.step"):
        got = torch.cat(list(generator.frame_chunks(_prompt(generator), GREEDY, cancel=None)))
    assert torch.equal(got, expected)  # the voice is unchanged
    assert calls["n"] == 1 and not step.compiled and step.decoder == step.decoder_step
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "eagerly" in lines[0] and "inductor exploded" in lines[0]
    assert "traceback" not in lines[0]  # one line, not a wall


def _prompt(generator: CsmGenerator):
    return generator.utterance("Hello.", speaker=4, config=GREEDY, max_frames=6).prompt


def test_compile_setting_resolves_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) is None and compile_mode("auto", cuda) == "reduce-overhead"
    assert compile_mode("on", cpu) == "default" and compile_mode("on", cuda) == "reduce-overhead"
    assert compile_mode("off", cuda) is None
    with pytest.raises(msgspec.ValidationError, match="compile"):
        msgspec.convert({"compile": "sometimes"}, CsmSettings)


def test_engine_warm_up_compiles_into_the_model_cache(make_generator, monkeypatch, tmp_path, caplog) -> None:
    """The warm-up compiles (before start-up reports ok), with inductor's cache under HF_HOME."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    modes: list[str] = []
    monkeypatch.setattr(FrameStep, "compile", lambda self, mode: modes.append(mode))  # the real one: above
    engine = CsmEngine(make_generator(), CsmSettings(compile="on"))
    with caplog.at_level(logging.INFO, logger="app.engines.tts.csm.engine"):
        engine.warm_up()
    assert modes == ["default"]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_cuda_graphs_give_the_eager_greedy_codes(text_tokenizer) -> None:
    """On a GPU, `reduce-overhead` replays both steps as CUDA graphs; float32 so codes must agree."""
    model = one_layer_model(seed=3, device="cuda")
    generator = CsmGenerator(model, text_tokenizer, mimi=object(), seed=0)  # frames only: no Mimi needed
    prompt = generator.utterance("I can help you plan a trip.", speaker=4, config=GREEDY, max_frames=FRAMES).prompt

    def frames() -> torch.Tensor:
        model.reset_caches()
        with torch.no_grad():
            return torch.cat(list(generator.frame_chunks(prompt, GREEDY, cancel=None))).cpu()

    eager = frames()
    generator.step.compile("reduce-overhead")
    generator.step.warm(topk=GREEDY.topk, temperature=GREEDY.temperature)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = frames()
    assert generator.step.compiled and torch.equal(compiled, eager)
