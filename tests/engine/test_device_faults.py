"""Whose fault a failure is. A CUDA error in the model's forward, or an
out-of-memory that persists for one request alone, is the device's: the
engine stops (DeviceFault). An out-of-memory of a whole batch is retried
split and costs nothing. An exception from one request's own state, in the
forward, in ``schedule()`` or in ``update()``, fails that request alone."""
from __future__ import annotations

import pytest
import torch

from sampler.params import DiffusionParams
from server.config import ModelConfig, SchedulerConfig
from server.engine.engine import LLMEngine
from server.engine.faults import DeviceFault, is_device_error, is_out_of_memory
from server.engine.request import Request

PARAMS = DiffusionParams(gen_length=8, steps=8, block_length=4, temperature=0.5, seed=0)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
POISON = 20  # the first prompt token of the request a test breaks


@pytest.fixture
def engine(golden_dir) -> LLMEngine:
    return LLMEngine(ModelConfig(str(golden_dir), dtype="float32", device="cpu"), SchedulerConfig())


def run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, object]:
    """Every request to its end: req_id -> its finished output."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, PARAMS)
    done = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                done[out.req_id] = out
        if not engine.has_unfinished():
            return done
    raise AssertionError("did not finish")


def break_forward(engine: LLMEngine, error, when=lambda batch: True) -> None:
    """The model's forward raises ``error()`` when ``when(batch size)``."""
    model = engine.runner.model
    real = model.forward

    def forward(*args, **kwargs):
        cu = kwargs.get("cu_seqlens", args[2] if len(args) > 2 else None)
        if when(len(cu) - 1 if cu is not None else 1):
            raise error()
        return real(*args, **kwargs)

    model.forward = forward


CUDA_ERRORS = [
    lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    lambda: RuntimeError("CUDA error: device-side assert triggered"),
    lambda: RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"),
]


@pytest.mark.parametrize("error", CUDA_ERRORS)
def test_a_cuda_error_stops_the_engine(engine, error):
    break_forward(engine, error)
    with pytest.raises(DeviceFault, match="device fault"):
        run(engine, PROMPTS)


def test_an_out_of_memory_that_persists_alone_stops_the_engine(engine):
    break_forward(engine, lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(DeviceFault, match="OutOfMemoryError"):
        run(engine, PROMPTS)


OUT_OF_MEMORY = [
    lambda: torch.OutOfMemoryError("CUDA out of memory"),
    # cuBLAS failing to allocate its workspace: worded as a CUDA error, but a smaller batch avoids it.
    lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY)
def test_a_batchs_out_of_memory_is_retried_split(engine, golden_dir, error):
    expected = run(LLMEngine(ModelConfig(str(golden_dir), dtype="float32", device="cpu"), SchedulerConfig()),
                   PROMPTS)
    break_forward(engine, error, when=lambda batch: batch > 1)
    got = run(engine, PROMPTS)
    assert {k: (v.finish_reason, v.token_ids) for k, v in got.items()} == \
        {k: (v.finish_reason, v.token_ids) for k, v in expected.items()}


def test_one_requests_error_in_schedule_fails_it_alone(engine, golden_dir, monkeypatch):
    real = Request.masked_positions

    def masked_positions(self):
        if self.prompt_ids[0] == POISON:
            raise IndexError("broken canvas")
        return real(self)

    monkeypatch.setattr(Request, "masked_positions", masked_positions)
    got = run(engine, [*PROMPTS, [POISON, 6]])
    assert got["r3"].finish_reason == "error" and "IndexError: broken canvas" in got["r3"].error
    assert [got[f"r{i}"].finish_reason for i in range(3)] == ["length"] * 3
    assert not engine.scheduler.running and engine.scheduler.pages.num_free == engine.scheduler.pages.num_pages


def test_one_requests_error_in_update_fails_it_alone(engine, monkeypatch):
    real = Request.commit

    def commit(self, *args, **kwargs):
        if self.prompt_ids[0] == POISON and self.num_forward_steps == 2:
            raise ValueError("bad commit")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Request, "commit", commit)
    got = run(engine, [*PROMPTS, [POISON, 6]])
    assert got["r3"].finish_reason == "error" and "ValueError: bad commit" in got["r3"].error
    assert [got[f"r{i}"].finish_reason for i in range(3)] == ["length"] * 3


def test_classification():
    assert is_device_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert is_device_error(RuntimeError("CUDA error: misaligned address"))
    assert not is_device_error(RuntimeError("shape mismatch"))
    assert not is_device_error(ValueError("CUDA error in a message of a request's own"))
    alloc = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert not is_device_error(alloc) and is_out_of_memory(alloc)
    assert is_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not is_out_of_memory(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
