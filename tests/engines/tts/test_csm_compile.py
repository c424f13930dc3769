"""The compiled frame step against the eager one: same greedy codes and logits; a loud fallback to eager
when compiling fails in the warm-up, and only then (a later error is raised, not retried eagerly).

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
STEP_LOG = "app.engines.tts.csm.step"
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


def _frames(generator: CsmGenerator) -> torch.Tensor:
    """A greedy 6-frame utterance's codes, from reset caches as every utterance starts."""
    generator.model.reset_caches()
    with torch.no_grad():
        return torch.cat(list(generator.frame_chunks(_prompt(generator), GREEDY, cancel=None)))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The step's own warnings (torch logs its compile errors too, at length)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == STEP_LOG]


def test_a_compile_failure_in_the_warm_up_falls_back_to_eager_with_a_warning(make_generator, caplog) -> None:
    """What the shipped image did: Triton found no C compiler for its launcher; torch wraps that error."""
    from torch._dynamo.exc import BackendCompilerFailed

    generator = make_generator(seed=3)
    expected = _frames(generator)
    step = generator.step
    calls: list[int] = []

    def failing_compile(*args) -> StepOutput:
        calls.append(1)
        step.backbone_step(*args)  # the caches are half-written when it fails
        missing = RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        raise BackendCompilerFailed(failing_compile, missing, None)

    step.backbone, step.decoder, step.compiled = failing_compile, failing_compile, True  # as torch.compile leaves it
    with caplog.at_level(logging.INFO, logger=STEP_LOG):
        step.warm(topk=GREEDY.topk, temperature=GREEDY.temperature)
    assert calls == [1] and not step.compiled
    assert (step.backbone, step.decoder) == (step.backbone_step, step.decoder_step)
    (line,) = _warnings(caplog)
    assert line.startswith("csm: running the frame step eagerly: torch.compile failed in the warm-up: ")
    # The cause, not torch's wrapper's first line ("backend='failing_compile' raised:"), and one line only.
    assert line.endswith("BackendCompilerFailed <- RuntimeError: Failed to find C compiler. Please specify via "
                         "CC environment variable.")
    assert torch.equal(_frames(generator), expected)  # the voice is unchanged


def test_no_cxx_compiler_for_inductor_falls_back_in_the_warm_up(text_tokenizer, mimi, caplog, monkeypatch,
                                                                tmp_path) -> None:
    """The same failure for real, on a CPU: inductor's C++ kernels need a compiler, and there is none."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no kernel compiled before is loaded
    generator = CsmGenerator(one_layer_model(seed=3), text_tokenizer, mimi, seed=0)
    expected = _frames(generator)
    torch._dynamo.reset()  # the step's code was compiled above: this one must compile afresh
    generator.step.compile("default")
    try:
        with torch._inductor.config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),), "fx_graph_cache": False}), \
                caplog.at_level(logging.INFO, logger=STEP_LOG):
            generator.step.warm(topk=GREEDY.topk, temperature=GREEDY.temperature)
    finally:
        torch._dynamo.reset()
    assert not generator.step.compiled
    (line,) = _warnings(caplog)
    assert "torch.compile failed in the warm-up" in line and "InvalidCxxCompiler" in line
    assert torch.equal(_frames(generator), expected)


def test_an_error_after_the_warm_up_is_raised_not_retried_eagerly(make_generator, caplog) -> None:
    """Out of memory, a device assert: the step stopped halfway, and only the next reply starts clean."""
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    generator = make_generator(seed=3)
    expected = _frames(generator)
    step = generator.step
    eager_decoder = step.decoder_step
    calls: list[int] = []
    fail_at = {"call": 0}

    def compiled_decoder(*args) -> StepOutput:  # stands in for the compiled function; it computes the same
        calls.append(1)
        if len(calls) == fail_at["call"]:
            raise error
        return eager_decoder(*args)

    step.backbone, step.decoder, step.compiled = step.backbone_step, compiled_decoder, True
    step.warm(topk=GREEDY.topk, temperature=GREEDY.temperature)  # compiles and captures: fine
    calls.clear()
    fail_at["call"] = 40  # frame 2, codebook 9: the decoder cache holds half a frame
    step.decoder_step = lambda *args: pytest.fail("the failed step was retried eagerly")
    with caplog.at_level(logging.INFO, logger=STEP_LOG), pytest.raises(type(error)) as raised:
        _frames(generator)
    assert raised.value is error and len(calls) == 40
    assert step.compiled and step.decoder is compiled_decoder and not _warnings(caplog)
    del step.decoder_step  # the method again
    fail_at["call"] = 0
    assert torch.equal(_frames(generator), expected)  # the next reply starts from reset caches, compiled


def test_a_failing_eager_warm_up_is_raised(make_generator) -> None:
    step = make_generator().step

    def broken(*args) -> StepOutput:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    step.decoder = step.decoder_step = broken  # nothing compiled: no fallback to hide it behind
    with pytest.raises(RuntimeError, match="illegal memory access"):
        step.warm(topk=GREEDY.topk, temperature=GREEDY.temperature)


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
