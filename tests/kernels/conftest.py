"""Kernel tests compare each Triton kernel with its torch twin. With CUDA the
kernels run compiled on the GPU; without it they run on CPU tensors under the
Triton interpreter, switched on here before any test imports a kernel module
(the interpreter computes bfloat16 wrongly, so bf16 tests are GPU-only)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend():
    """The ops forced onto the Triton kernels for one test."""
    from kernels import ops

    ops.set_backend("triton")
    yield ops
    ops.set_backend("auto")
