"""Fixtures for the CSM tests: tiny random models, a tiny trained tokenizer, a random full-size Mimi."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from app.engines.tts.csm.generator import CsmGenerator, GenerationConfig
from app.engines.tts.csm.loader import TextTokenizer, load_text_tokenizer
from app.engines.tts.csm.model import CsmModel, CsmModelConfig
from tests.support import build_tokenizer_json


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_json(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def text_tokenizer(tokenizer_json: Path) -> TextTokenizer:
    return load_text_tokenizer(str(tokenizer_json))


@pytest.fixture(scope="session")
def mimi():
    """Mimi at its real size with random weights (decodes ~25 ms a frame on one CPU core)."""
    from moshi.models import loaders

    torch.manual_seed(1234)
    return loaders.get_mimi(None, device="cpu", num_codebooks=32)


def tiny_model(seed: int = 0, **overrides) -> CsmModel:
    torch.manual_seed(seed)
    config = CsmModelConfig.tiny(**overrides)
    return CsmModel(config).prepare(device="cpu", dtype=torch.float32)


@pytest.fixture
def make_generator(text_tokenizer, mimi) -> Callable[..., CsmGenerator]:
    def make(seed: int = 0, **overrides) -> CsmGenerator:
        return CsmGenerator(tiny_model(seed, **overrides), text_tokenizer, mimi, seed=seed)

    return make


@pytest.fixture
def fast_config() -> GenerationConfig:
    return GenerationConfig(first_chunk_frames=2, chunk_frames=4, repeat_stop_frames=16)


class ScriptedFrames:
    """Stands in for CsmGenerator.generate_frame: returns the given frames in order, counting calls."""

    def __init__(self, frames: list[list[int]] | Callable[[int], list[int]], num_codebooks: int = 32) -> None:
        self.frames = frames
        self.num_codebooks = num_codebooks
        self.calls = 0

    def __call__(self, tokens, mask, positions, config) -> torch.Tensor:
        index = self.calls
        self.calls += 1
        frame = self.frames(index) if callable(self.frames) else self.frames[index]
        return torch.tensor([frame], dtype=torch.long)


def varying_frame(index: int, num_codebooks: int = 32) -> list[int]:
    """A valid, never-EOS, never-repeating frame."""
    return [1 + (index * 7 + c) % 60 for c in range(num_codebooks)]


@pytest.fixture
def scripted() -> Iterator[type[ScriptedFrames]]:
    yield ScriptedFrames
