"""The ops the model and sampler call. Each dispatches to its Triton kernel
on CUDA tensors and to the torch twin in ``kernels.reference`` elsewhere;
``set_backend`` forces one for tests and benchmarks."""
from __future__ import annotations

from kernels import reference

_BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend must be one of {_BACKENDS}, got {name!r}")
    global _backend
    _backend = name


def get_backend() -> str:
    return _backend


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)


def unmask_scores(logits, temperature, seed, row_offset, **kwargs):
    return reference.unmask_scores(logits, temperature, seed, row_offset, **kwargs)


def select_commits(confidence, row_seq, quota, threshold=None):
    return reference.select_commits(confidence, row_seq, quota, threshold)
