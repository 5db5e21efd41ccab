"""The ops the model and sampler call. Each dispatches to its Triton kernel
(``kernels.attention``, ``kernels.unmask``, ``kernels.moe``) or to its torch twin in
``kernels.reference``:

- backend "auto" (default): Triton for CUDA tensors when triton is
  installed, the twin otherwise (CPU, or no triton: it is an optional extra);
- "triton": always the kernels (tests run them on CPU tensors under
  ``TRITON_INTERPRET=1``); a clear error if triton is missing;
- "torch": always the twins.
float64 inputs always take the twin: the kernels compute in float32 and
float64 runs exist to match the reference exactly.

Importing this module never imports triton; the kernel modules are loaded on
first use.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

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


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    """Whether an op on tensor x runs its Triton kernel."""
    if _backend == "torch" or x.dtype == torch.float64:
        return False
    if _backend == "triton":
        if not triton_available():
            raise ModuleNotFoundError("kernel backend 'triton' needs the triton package "
                                      "(pip install 'llada-serve[triton]')")
        return True
    return x.is_cuda and triton_available()


def varlen_attention(
    q: torch.Tensor,  # (num_q_tokens, num_heads, head_dim)
    k: torch.Tensor,  # (num_k_tokens, num_kv_heads, head_dim)
    v: torch.Tensor,  # (num_k_tokens, num_kv_heads, head_dim)
    cu_seqlens_q: list[int],  # (num_seqs + 1,) query starts
    cu_seqlens_k: list[int],  # (num_seqs + 1,) current key starts
    **kwargs,  # k_cache, v_cache, block_table, cache_seqlens, scale, causal_block, positions, softmax_dtype,
    # cached_kv, key_plan: see kernels.reference
) -> torch.Tensor:
    # The kernel is non-causal only, with its softmax in float32; it reads cached keys in place.
    # causal_block may be a per-token tensor (block-causal sequences of several block lengths).
    causal = kwargs.get("causal_block")
    is_causal = isinstance(causal, torch.Tensor) or bool(causal)
    if _use_triton(q) and not is_causal and kwargs.get("softmax_dtype") in (None, torch.float32):
        kwargs.pop("softmax_dtype", None)
        kwargs.pop("cached_kv", None)
        kwargs.pop("key_plan", None)
        from kernels import attention
        return attention.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)
    return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)


def static_attention(
    q: torch.Tensor,  # (num_seqs * width, num_heads, head_dim)
    k: torch.Tensor,  # (num_seqs * width, num_kv_heads, head_dim)
    v: torch.Tensor,  # (num_seqs * width, num_kv_heads, head_dim)
    k_cache: torch.Tensor,  # (num_pages, page_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,  # (num_pages, page_size, num_kv_heads, head_dim)
    block_table: torch.Tensor,  # (num_seqs, max_pages) int32
    cache_seqlens: torch.Tensor,  # (num_seqs,) int32
) -> torch.Tensor:
    """Attention of equal-width sequences over paged keys, every length a
    device tensor: no host reads, shapes fixed by the arguments' shapes (a
    captured step's attention; ``kernels.reference.static_attention``)."""
    if _use_triton(q):
        from kernels import attention
        return attention.static_attention(q, k, v, k_cache, v_cache, block_table, cache_seqlens)
    return reference.static_attention(q, k, v, k_cache, v_cache, block_table, cache_seqlens)


def unmask_scores(
    logits: torch.Tensor,  # (num_rows, vocab)
    temperature: torch.Tensor,  # (num_rows,) float32, 0 = greedy
    seed: torch.Tensor,  # (num_rows,) int64
    row_offset: torch.Tensor,  # (num_rows,) int64
    **kwargs,  # banned_ids, with_margin, with_entropy, any_sampled: see kernels.reference
) -> dict[str, torch.Tensor]:
    if _use_triton(logits):
        kwargs.pop("any_sampled", None)  # the kernel reads each row's temperature itself
        from kernels import unmask
        return unmask.unmask_scores(logits, temperature, seed, row_offset, **kwargs)
    return reference.unmask_scores(logits, temperature, seed, row_offset, **kwargs)


def select_commits(
    confidence: torch.Tensor,  # (num_rows,) float32
    row_seq: torch.Tensor,  # (num_rows,) int64 row -> sequence index
    quota: torch.Tensor,  # (num_seqs,) int64
    threshold: torch.Tensor | None = None,  # (num_seqs,) float32; > 0 selects the threshold rule
    canvas: torch.Tensor | None = None,  # contiguous token ids, written in place when given
    positions: torch.Tensor | None = None,  # (num_rows,) int64 row -> flat index into canvas
    x0: torch.Tensor | None = None,  # (num_rows,) int64 row -> predicted token
) -> torch.Tensor:
    """(num_rows,) bool rows to commit; with ``canvas`` also writes the
    committed rows' x0 into it (``reference.commit_to_canvas``). CPU tensors
    take ``reference.select_commits_host`` (numpy, equal to the torch twin)."""
    if _use_triton(confidence):
        from kernels import unmask
        return unmask.select_commits(confidence, row_seq, quota, threshold, canvas, positions, x0)
    if confidence.is_cpu:  # numpy's twin of the twin: host time per step (reference.select_commits_host)
        commit = torch.from_numpy(reference.select_commits_host(
            confidence.numpy(), row_seq.numpy(), quota.numpy(), None if threshold is None else threshold.numpy()))
    else:
        commit = reference.select_commits(confidence, row_seq, quota, threshold)
    if canvas is not None:
        if positions is None or x0 is None:
            raise ValueError("writing the canvas needs positions and x0")
        reference.commit_to_canvas(canvas, positions, x0, commit)
    return commit


def fused_moe(
    x: torch.Tensor,  # (num_tokens, hidden)
    w_gate_up: torch.Tensor,  # (num_experts, 2 * intermediate, hidden)
    w_down: torch.Tensor,  # (num_experts, hidden, intermediate)
    topk_ids: torch.Tensor,  # (num_tokens, top_k) int64
    topk_weights: torch.Tensor,  # (num_tokens, top_k)
) -> torch.Tensor:
    """The routed experts' weighted sum (``kernels.reference.fused_moe``)."""
    if _use_triton(x):
        from kernels import moe
        return moe.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)
    return reference.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)
