"""Fused mixture of SwiGLU experts: the Triton twin of
``kernels.reference.fused_moe``.

Four steps, none of which reads a value back to the host (so a call can sit
inside a CUDA graph):
1. ``align``: the (token, k) pairs are sorted by expert (a stable sort) and
   each expert's run is padded to a multiple of ``BLOCK_M`` rows, so that a
   block of ``BLOCK_M`` rows belongs to one expert; the padding rows hold
   the sentinel ``num_pairs``. Experts with no pairs get no block.
2. ``_gate_up_kernel``: per (block, column tile) a GEMM of the block's
   tokens (gathered from x) by the expert's gate and up rows, two float32
   accumulators, SiLU(gate) * up fused in the epilogue; the activations are
   written in sorted order (one row per sorted slot).
3. ``_down_kernel``: per (block, column tile) the activations by the
   expert's down projection; the epilogue rounds the expert output to x's
   dtype (as the twin does), multiplies by the pair's routing weight in
   float32 and writes it at the pair's own row.
4. ``_combine_kernel``: each token's top_k weighted rows summed in k order
   (deterministic: no atomics), cast to x's dtype.
The grid of the two GEMMs is sized for the most blocks any routing can need
(``num_pairs + min(num_experts, num_pairs) * (BLOCK_M - 1)`` rows, in
whole blocks); blocks
past the routing's own end return at once, so an expert with no tokens costs
one program that reads one integer.

Numerics: float32 accumulation; 16-bit dot operands stay 16-bit on CUDA,
float32 ones use IEEE float32 dots (no TF32). Off CUDA (the interpreter)
bfloat16 is computed in float32, as in ``kernels.attention``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The pair and token counts change from step to step: they are not specialized
# on (one compiled variant per tile shape, not one per count's divisibility).


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(
    x_ptr, w_ptr, act_ptr, pair_ptr, block_expert_ptr,
    num_pairs, hidden, inter, num_experts,
    stride_x, stride_we, stride_wn, stride_act,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:  # past the routing's last block
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + rows)
    is_pair = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    is_col = cols < inter
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        is_k = ks < hidden
        a = tl.load(x_ptr + token[:, None] * stride_x + ks[None, :],
                    mask=is_pair[:, None] & is_k[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, BLOCK_K)
        w_mask = is_k[:, None] & is_col[None, :]
        gate = tl.load(w_expert + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
        up = tl.load(w_expert + (cols + inter)[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        acc_gate += tl.dot(a, gate.to(DOT_DTYPE), input_precision=PRECISION)
        acc_up += tl.dot(a, up.to(DOT_DTYPE), input_precision=PRECISION)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(act_ptr + rows.to(tl.int64)[:, None] * stride_act + cols[None, :],
             act.to(act_ptr.dtype.element_ty), mask=is_pair[:, None] & is_col[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(
    act_ptr, w_ptr, weight_ptr, y_ptr, pair_ptr, block_expert_ptr,
    num_pairs, hidden, inter, num_experts,
    stride_act, stride_we, stride_wn, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + rows)
    is_pair = pair < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    is_col = cols < hidden
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        is_k = ks < inter
        a = tl.load(act_ptr + rows.to(tl.int64)[:, None] * stride_act + ks[None, :],
                    mask=is_pair[:, None] & is_k[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_expert + cols[None, :] * stride_wn + ks[:, None],
                    mask=is_k[:, None] & is_col[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(a, w.to(DOT_DTYPE), input_precision=PRECISION)
    weight = tl.load(weight_ptr + pair, mask=is_pair, other=0.0).to(tl.float32)
    # The expert output rounded to the activations' dtype first, as the twin's GEMM returns it.
    y = acc.to(act_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * stride_y + cols[None, :], y,
             mask=is_pair[:, None] & is_col[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_kernel(y_ptr, out_ptr, num_tokens, hidden, stride_y, stride_out,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tokens < num_tokens)[:, None] & (cols < hidden)[None, :]
    rows = tokens.to(tl.int64) * TOP_K
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (rows + k)[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most sorted rows any routing of num_pairs pairs can need (every
    expert that gets a pair pads its run by at most block_m - 1 rows), in
    whole blocks."""
    return triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups the (token, k) pairs by expert in runs padded to block_m rows.

    Returns ``sorted_pairs`` (max_padded_rows,) int32: pair index t * top_k
    + k for each sorted row, ``num_pairs`` on padding rows and past the end;
    and ``block_expert`` (max_padded_rows / block_m,) int32: the expert of
    each block of block_m rows, ``num_experts`` past the routing's last
    block. Pairs keep their order within an expert; no host sync."""
    flat = topk_ids.reshape(-1).to(torch.int64)  # scatter_add_ indexes with int64
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (num_experts,) pairs per expert
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # (num_experts,) where each expert's padded run ends
    run_start = torch.cumsum(counts, 0) - counts  # (num_experts,) its first pair in sorted order
    sorted_expert, order = torch.sort(flat, stable=True)
    rank = torch.arange(num_pairs, device=device) - run_start[sorted_expert]  # position within its expert
    dest = padded_end[sorted_expert] - padded[sorted_expert] + rank
    num_rows = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((num_rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, num_rows, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    return sorted_pairs, block_expert


def _launch_config(num_pairs: int, num_experts: int, is_cuda: bool) -> dict[str, int]:
    """Tiles: BLOCK_M near the mean pairs per expert (16-64: a block of
    mostly padding wastes tensor-core work, the weights are read once per
    block either way); off CUDA few, large tiles (the interpreter runs each
    program's tile ops as numpy calls, one program after another)."""
    mean = max(1, num_pairs // num_experts)
    if not is_cuda:
        block_m = min(128, max(16, 2 * triton.next_power_of_2(mean)))
        return {"block_m": block_m, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 1}
    block_m = min(64, max(16, triton.next_power_of_2(mean)))
    return {"block_m": block_m, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}


def fused_moe(
    x: torch.Tensor,  # (num_tokens, hidden)
    w_gate_up: torch.Tensor,  # (num_experts, 2 * intermediate, hidden): gate rows, then up rows
    w_down: torch.Tensor,  # (num_experts, hidden, intermediate)
    topk_ids: torch.Tensor,  # (num_tokens, top_k) integer experts chosen per token
    topk_weights: torch.Tensor,  # (num_tokens, top_k) their weights
    block_m: int | None = None,  # rows per block; None = chosen from the shapes
) -> torch.Tensor:
    """Triton version of ``kernels.reference.fused_moe`` (same arguments and
    result, (num_tokens, hidden) in x's dtype). Expert ids must lie in
    [0, num_experts): they are not checked on the device."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.ndim != 2 or w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(f"x must be 2-D and the weights 3-D, got {tuple(x.shape)}, "
                         f"{tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    num_tokens, hidden = x.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    if w_gate_up.shape != (num_experts, 2 * inter, hidden) or w_down.shape[1] != hidden:
        raise ValueError(f"w_gate_up {tuple(w_gate_up.shape)} must be (num_experts, 2 * intermediate, hidden) "
                         f"and w_down {tuple(w_down.shape)} (num_experts, hidden, intermediate), hidden {hidden}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be (num_tokens={num_tokens}, top_k)")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must hold integers, got {topk_ids.dtype}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} rows must be contiguous")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("Triton fused_moe needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "triton is imported)")
    x = x.contiguous()
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    out = torch.empty_like(x)
    if num_pairs == 0:
        return out
    is_cuda = x.device.type == "cuda"
    config = _launch_config(num_pairs, num_experts, is_cuda)
    block_m = block_m or config["block_m"]
    sorted_pairs, block_expert = align(topk_ids.to(x.device), num_experts, block_m)
    weights = topk_weights.reshape(-1).contiguous()
    act = torch.empty((sorted_pairs.numel(), inter), dtype=x.dtype, device=x.device)  # (sorted rows, I)
    y = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)  # (pair, hidden) weighted
    # The interpreter's bfloat16 arithmetic is wrong: there, bf16 dots run in float32.
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16 if is_cuda else tl.float32}
    dot_dtype = dot_dtype.get(x.dtype, tl.float32)
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    num_blocks = block_expert.numel()
    block_n, block_k = config["block_n"], config["block_k"]
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    block_n_up = min(block_n, _pow2(inter))
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n_up))](
        x, w_gate_up, act, sorted_pairs, block_expert, num_pairs, hidden, inter, num_experts,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n_up, BLOCK_K=min(block_k, _pow2(hidden)),
        DOT_DTYPE=dot_dtype, PRECISION=precision, **launch,
    )
    block_n_down = min(block_n, _pow2(hidden))
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n_down))](
        act, w_down, weights, y, sorted_pairs, block_expert, num_pairs, hidden, inter, num_experts,
        act.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n_down, BLOCK_K=min(block_k, _pow2(inter)),
        DOT_DTYPE=dot_dtype, PRECISION=precision, **launch,
    )
    block_h = min(1024 if is_cuda else 4096, triton.next_power_of_2(hidden))
    block_t = min(triton.next_power_of_2(num_tokens), max(1, (4096 if is_cuda else 65536) // block_h))
    _combine_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
        y, out, num_tokens, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h,
    )
    return out


def _pow2(n: int) -> int:
    """The tile that covers n: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs and knobs.runtime.interpret)
