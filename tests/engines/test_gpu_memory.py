"""GPU memory per model: the figures each load logs (over a pretend card), skipped cleanly without CUDA."""

from __future__ import annotations

import logging

import pytest

from app.config import load_settings
from app.engines.gpu_memory import GpuMemory
from app.startup import gpu_meter


@pytest.mark.cuda
def test_gpu_memory_is_skipped_without_a_gpu_model_or_cuda(cpu_settings):
    assert gpu_meter(cpu_settings) is None  # nothing on the GPU: torch is not even asked
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the meter is real here (see the GPU test below)")
    assert gpu_meter(load_settings("gpu", environ={})) is None


class FakeCuda:
    """torch.cuda's memory calls over a pretend 8 GB card."""

    total = 8_000_000_000

    def __init__(self) -> None:
        self.used = 500_000_000  # the CUDA context
        self.tensors = 0

    def mem_get_info(self):
        return self.total - self.used, self.total

    def memory_allocated(self):
        return self.tensors

    def synchronize(self):
        pass


def test_gpu_memory_log_names_each_model_and_the_total(caplog):
    class FakeTorch:
        cuda = FakeCuda()

    gpu = GpuMemory(FakeTorch)
    with caplog.at_level(logging.INFO, logger="app.engines.gpu_memory"):
        with gpu.measure("asr"):
            FakeTorch.cuda.used += 1_600_000_000  # CTranslate2: outside torch's allocator
        with gpu.measure("tts"):
            FakeTorch.cuda.used += 3_400_000_000
            FakeTorch.cuda.tensors += 3_100_000_000
        gpu.report()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "gpu memory: asr took 1.60 GB (torch tensors 0.00 GB); 2.10 GB of 8.00 GB in use"
    assert lines[1] == "gpu memory: tts took 3.40 GB (torch tensors 3.10 GB); 5.50 GB of 8.00 GB in use"
    assert lines[2] == (
        "gpu memory after warm-up: asr 1.60 GB, tts 3.40 GB; 5.50 GB of 8.00 GB in use "
        "(CUDA context and other processes: 0.50 GB)"
    )


@pytest.mark.cuda
def test_gpu_memory_meter_sees_a_real_allocation():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (measures a real allocation)")
    gpu = GpuMemory(torch)
    with gpu.measure("block"):
        block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    assert gpu.per_model["block"] >= 256 * 2**20
    del block
