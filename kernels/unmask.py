"""Fused unmasking: logits -> (x0, confidence) in one pass per row, then the
per-sequence choice of rows to commit, written into the canvas in place.
Triton twins of ``unmask_scores``, ``gumbel_noise``, ``select_commits`` and
``commit_to_canvas`` in ``kernels.reference``.

Promises:
- ``unmask_scores`` reads each row of logits once, tile by tile, keeping an
  online max / sum (and entropy and top-2 terms) in registers: it writes only
  O(rows) outputs and allocates nothing of size (rows, vocab). Long rows in
  small batches are cut into vocab chunks merged by a second small kernel.
- Its Gumbel noise is drawn in-kernel with ``tl.rand(seed[r], row_offset[r]
  * vocab + v)``: the uniforms are bit-identical to the twin's
  ``philox_uniform``; the noise ``-log(-log(u))`` agrees to the last few
  ulps (the two ``log`` implementations differ), so x0 equals the twin's
  except at near-exact ties.
- ``select_commits`` ranks rows by pairwise comparison (no sort, no host
  sync, any row order), so it can run inside a CUDA graph.
All arithmetic is float32; float64 logits are for the twin.
"""
from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_V = 2048  # vocab tile on the GPU: 8 values a thread at 8 warps
BLOCK_V_INTERPRETED = 1024  # fewer, larger numpy ops are faster in the interpreter
MIN_CHUNK = 8192  # vocab chunks of a row are at least this long
SELECT_BLOCK_I = 32  # rows ranked per program
SELECT_BLOCK_J = 128  # rows compared against per step
NEG_INF = tl.constexpr(float("-inf"))
NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _gumbel(seed, offset):
    """Standard Gumbel noise from Philox stream ``seed`` at ``offset``."""
    return -tl.log(-tl.log(tl.rand(seed, offset)))


@triton.jit
def _merge(m_a, s_a, w_a, best_a, idx_a, logit_a, top2_a,
           m_b, s_b, w_b, best_b, idx_b, logit_b, top2_b):
    """Merges two partial row states. A state over a set of vocab entries:
    m = max logit, s = sum exp(l - m), w = sum exp(l - m) * (l - m),
    (best, idx, logit) = max score, its lowest index and its logit,
    top2 = second largest logit (m is the largest)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == NEG_INF, 0.0, m)
    d_a = tl.where(m_a == NEG_INF, 0.0, m_a - m_safe)  # <= 0; an empty state has s = w = 0
    d_b = tl.where(m_b == NEG_INF, 0.0, m_b - m_safe)
    c_a = tl.exp(d_a)
    c_b = tl.exp(d_b)
    s = s_a * c_a + s_b * c_b
    w = c_a * (w_a + d_a * s_a) + c_b * (w_b + d_b * s_b)
    take_b = (best_b > best_a) | ((best_b == best_a) & (idx_b < idx_a))
    best = tl.where(take_b, best_b, best_a)
    idx = tl.where(take_b, idx_b, idx_a)
    logit = tl.where(take_b, logit_b, logit_a)
    top2 = tl.maximum(tl.minimum(m_a, m_b), tl.maximum(top2_a, top2_b))
    return m, s, w, best, idx, logit, top2


@triton.jit
def _unmask_kernel(
    logits_ptr, temperature_ptr, seed_ptr, row_offset_ptr, banned_ptr,
    x0_ptr, prob_ptr, margin_ptr, entropy_ptr, part_ptr, part_idx_ptr,
    stride_row, num_rows, vocab, chunk_size,
    NUM_BANNED: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
    WITH_MARGIN: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    noise_base = tl.load(row_offset_ptr + row).to(tl.int64) * vocab
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lo = chunk * chunk_size
    hi = tl.minimum(lo + chunk_size, vocab)

    m = tl.full([], NEG_INF, tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    best = tl.full([], NEG_INF, tl.float32)
    idx = tl.full([], NO_INDEX, tl.int32)
    logit = tl.full([], NEG_INF, tl.float32)
    top2 = tl.full([], NEG_INF, tl.float32)
    # Software prefetch: the next tile's load is in flight while this one is reduced.
    v_next = lo + tl.arange(0, BLOCK)
    l_next = tl.load(row_ptr + v_next, mask=v_next < hi, other=NEG_INF)  # (BLOCK,)
    for start in range(lo, hi, BLOCK):
        v = start + tl.arange(0, BLOCK)
        is_vocab = v < hi
        l = l_next.to(tl.float32)
        l_next = tl.load(row_ptr + v + BLOCK, mask=v + BLOCK < hi, other=NEG_INF)
        for b in tl.static_range(NUM_BANNED):
            l = tl.where(v == tl.load(banned_ptr + b), NEG_INF, l)
        # This tile's state, then merged into the running one.
        t_m = tl.max(l, 0)
        t_safe = tl.where(t_m == NEG_INF, 0.0, t_m)
        e = tl.exp(l - t_safe)
        t_s = tl.sum(e, 0)
        t_w = 0.0
        if WITH_ENTROPY:
            t_w = tl.sum(e * tl.where(l > NEG_INF, l - t_safe, 0.0), 0)
        t_idx1 = tl.min(tl.where(l == t_m, v, NO_INDEX), 0)  # first index of the max logit
        t_top2 = NEG_INF
        if WITH_MARGIN:
            t_top2 = tl.max(tl.where(v == t_idx1, NEG_INF, l), 0)
        if temperature > 0:
            score = tl.where(is_vocab, tl.div_rn(l, temperature) + _gumbel(seed, noise_base + v), NEG_INF)
            t_best = tl.max(score, 0)
            t_idx = tl.min(tl.where(score == t_best, v, NO_INDEX), 0)
            t_logit = tl.max(tl.where(v == t_idx, l, NEG_INF), 0)
        else:
            t_best = t_m
            t_idx = t_idx1
            t_logit = t_m
        m, s, w, best, idx, logit, top2 = _merge(m, s, w, best, idx, logit, top2,
                                                 t_m, t_s, t_w, t_best, t_idx, t_logit, t_top2)
    if NUM_CHUNKS == 1:
        _finish(row, m, s, w, idx, logit, top2, x0_ptr, prob_ptr, margin_ptr, entropy_ptr,
                WITH_MARGIN, WITH_ENTROPY)
    else:
        part = part_ptr + (chunk * num_rows + row) * 6  # (NUM_CHUNKS, num_rows, 6)
        tl.store(part + 0, m)
        tl.store(part + 1, s)
        tl.store(part + 2, w)
        tl.store(part + 3, best)
        tl.store(part + 4, logit)
        tl.store(part + 5, top2)
        tl.store(part_idx_ptr + chunk * num_rows + row, idx)


@triton.jit
def _finish(row, m, s, w, idx, logit, top2, x0_ptr, prob_ptr, margin_ptr, entropy_ptr,
            WITH_MARGIN: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Writes x0 and the confidences of a row from its whole-vocab state."""
    log_s = tl.log(s)
    tl.store(x0_ptr + row, idx.to(tl.int64))
    tl.store(prob_ptr + row, tl.exp(logit - m - log_s))
    if WITH_MARGIN:
        tl.store(margin_ptr + row, tl.exp(-log_s) - tl.exp(top2 - m - log_s))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - w / s)


@triton.jit
def _merge_chunks_kernel(part_ptr, part_idx_ptr, x0_ptr, prob_ptr, margin_ptr, entropy_ptr, num_rows,
                         NUM_CHUNKS: tl.constexpr, WITH_MARGIN: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0)
    m = tl.full([], NEG_INF, tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    best = tl.full([], NEG_INF, tl.float32)
    idx = tl.full([], NO_INDEX, tl.int32)
    logit = tl.full([], NEG_INF, tl.float32)
    top2 = tl.full([], NEG_INF, tl.float32)
    for chunk in tl.static_range(NUM_CHUNKS):
        part = part_ptr + (chunk * num_rows + row) * 6
        m, s, w, best, idx, logit, top2 = _merge(
            m, s, w, best, idx, logit, top2,
            tl.load(part + 0), tl.load(part + 1), tl.load(part + 2), tl.load(part + 3),
            tl.load(part_idx_ptr + chunk * num_rows + row), tl.load(part + 4), tl.load(part + 5))
    _finish(row, m, s, w, idx, logit, top2, x0_ptr, prob_ptr, margin_ptr, entropy_ptr,
            WITH_MARGIN, WITH_ENTROPY)


@triton.jit
def _gumbel_kernel(seed_ptr, row_offset_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offset = tl.load(row_offset_ptr + row).to(tl.int64) * vocab + v
    noise = _gumbel(tl.load(seed_ptr + row), offset)
    tl.store(out_ptr + row.to(tl.int64) * vocab + v, noise, mask=v < vocab)


@triton.jit
def _select_kernel(
    confidence_ptr, row_seq_ptr, quota_ptr, threshold_ptr, commit_ptr,
    canvas_ptr, positions_ptr, x0_ptr, num_rows,
    HAS_THRESHOLD: tl.constexpr, HAS_CANVAS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """rank(i) = rows of i's sequence ahead of i (more confident, or as
    confident with a lower index): the row's place in a stable sort."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    is_row = i < num_rows
    conf_i = tl.load(confidence_ptr + i, mask=is_row, other=NEG_INF)  # (BLOCK_I,)
    seq_i = tl.load(row_seq_ptr + i, mask=is_row, other=-1)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for start in range(0, num_rows, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        conf_j = tl.load(confidence_ptr + j, mask=j < num_rows, other=NEG_INF)  # (BLOCK_J,)
        seq_j = tl.load(row_seq_ptr + j, mask=j < num_rows, other=-2)
        ahead = (conf_j[None, :] > conf_i[:, None]) | ((conf_j[None, :] == conf_i[:, None])
                                                       & (j[None, :] < i[:, None]))
        same = seq_j[None, :] == seq_i[:, None]
        rank += tl.sum((ahead & same).to(tl.int32), 1)
    commit = rank < tl.load(quota_ptr + seq_i, mask=is_row, other=0)
    if HAS_THRESHOLD:
        threshold = tl.load(threshold_ptr + seq_i, mask=is_row, other=0.0)
        commit = tl.where(threshold > 0, (conf_i >= threshold) | (rank == 0), commit)
    tl.store(commit_ptr + i, commit, mask=is_row)
    if HAS_CANVAS:
        position = tl.load(positions_ptr + i, mask=is_row, other=0)
        token = tl.load(x0_ptr + i, mask=is_row, other=0)
        tl.store(canvas_ptr + position, token, mask=is_row & commit)


def _check_rows(name: str, t: torch.Tensor, num_rows: int, device: torch.device) -> None:
    if t.shape != (num_rows,) or t.device != device:
        raise ValueError(f"{name} must be ({num_rows},) on {device}, got {tuple(t.shape)} on {t.device}")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_chunks(num_rows: int, vocab: int, block: int, device: torch.device) -> int:
    """Vocab chunks per row so that small batches still give every SM about
    two programs."""
    if device.type != "cuda":
        return 1
    num_sms = _num_sms(device.index)
    wanted = triton.cdiv(2 * num_sms, max(num_rows, 1))
    return max(1, min(wanted, vocab // MIN_CHUNK, triton.cdiv(vocab, block)))


def unmask_scores(
    logits: torch.Tensor,  # (num_rows, vocab) float16 / bfloat16 / float32
    temperature: torch.Tensor,  # (num_rows,) float32, 0 = greedy
    seed: torch.Tensor,  # (num_rows,) int64 Philox seed of the row's request and step
    row_offset: torch.Tensor,  # (num_rows,) int64 the row's position in the generated part
    banned_ids: torch.Tensor | None = None,  # (num_banned,) token ids never predicted
    with_margin: bool = False,
    with_entropy: bool = False,
    num_chunks: int | None = None,  # vocab chunks per row; None = chosen for the GPU
    block_v: int | None = None,  # vocab tile; None = BLOCK_V (BLOCK_V_INTERPRETED off CUDA)
) -> dict[str, torch.Tensor]:
    """Triton version of ``kernels.reference.unmask_scores`` (same arguments
    and outputs; the last two tune the launch)."""
    if logits.ndim != 2 or logits.dtype not in SUPPORTED_DTYPES or logits.stride(1) != 1:
        raise ValueError(f"logits must be (num_rows, vocab) in {SUPPORTED_DTYPES} and contiguous "
                         f"in vocab, got {logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    num_rows, vocab = logits.shape
    device = logits.device
    for name, t in (("temperature", temperature), ("seed", seed), ("row_offset", row_offset)):
        _check_rows(name, t, num_rows, device)
    temperature = temperature.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    row_offset = row_offset.to(torch.int64).contiguous()
    if banned_ids is None:
        banned_ids = torch.zeros(0, dtype=torch.int32, device=device)
    banned_ids = banned_ids.to(device=device, dtype=torch.int32).contiguous()
    out = {"x0": torch.empty(num_rows, dtype=torch.int64, device=device),
           "prob": torch.empty(num_rows, dtype=torch.float32, device=device)}
    if with_margin:
        out["margin"] = torch.empty(num_rows, dtype=torch.float32, device=device)
    if with_entropy:
        out["entropy"] = torch.empty(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return out
    block = block_v or (BLOCK_V if device.type == "cuda" else BLOCK_V_INTERPRETED)
    block = min(block, triton.next_power_of_2(vocab))
    num_chunks = num_chunks or _num_chunks(num_rows, vocab, block, device)
    chunk_size = triton.cdiv(triton.cdiv(vocab, num_chunks), block) * block
    num_chunks = triton.cdiv(vocab, chunk_size)
    part = torch.empty((num_chunks, num_rows, 6) if num_chunks > 1 else (1,), dtype=torch.float32,
                       device=device)
    part_idx = torch.empty((num_chunks, num_rows) if num_chunks > 1 else (1,), dtype=torch.int32,
                           device=device)
    margin = out.get("margin", out["prob"])  # placeholders are never written
    entropy = out.get("entropy", out["prob"])
    _unmask_kernel[(num_rows, num_chunks)](
        logits, temperature, seed, row_offset, banned_ids,
        out["x0"], out["prob"], margin, entropy, part, part_idx,
        logits.stride(0), num_rows, vocab, chunk_size,
        NUM_BANNED=banned_ids.numel(), NUM_CHUNKS=num_chunks, BLOCK=block,
        WITH_MARGIN=with_margin, WITH_ENTROPY=with_entropy, num_warps=8 if block >= 2048 else 4,
    )
    if num_chunks > 1:
        _merge_chunks_kernel[(num_rows,)](
            part, part_idx, out["x0"], out["prob"], margin, entropy, num_rows,
            NUM_CHUNKS=num_chunks, WITH_MARGIN=with_margin, WITH_ENTROPY=with_entropy, num_warps=1,
        )
    return out


def gumbel_noise(seed: torch.Tensor, row_offset: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The noise ``unmask_scores`` adds, materialised (num_rows, vocab_size)
    float32: for tests against ``kernels.reference.gumbel_noise``."""
    num_rows = seed.shape[0]
    out = torch.empty((num_rows, vocab_size), dtype=torch.float32, device=seed.device)
    block = min(BLOCK_V, triton.next_power_of_2(vocab_size))
    _gumbel_kernel[(num_rows, triton.cdiv(vocab_size, block))](
        seed.to(torch.int64).contiguous(), row_offset.to(torch.int64).contiguous(), out, vocab_size,
        BLOCK=block)
    return out


def select_commits(
    confidence: torch.Tensor,  # (num_rows,) float32
    row_seq: torch.Tensor,  # (num_rows,) int64 row -> sequence index in [0, num_seqs)
    quota: torch.Tensor,  # (num_seqs,) int64 tokens to commit this step (quota rule)
    threshold: torch.Tensor | None = None,  # (num_seqs,) float32; > 0 selects the threshold rule
    canvas: torch.Tensor | None = None,  # any shape, contiguous token ids: written in place
    positions: torch.Tensor | None = None,  # (num_rows,) int64 row -> flat index into canvas
    x0: torch.Tensor | None = None,  # (num_rows,) int64 row -> predicted token
) -> torch.Tensor:
    """Triton version of ``kernels.reference.select_commits`` (returns the
    (num_rows,) bool commit mask); with ``canvas`` it also does
    ``commit_to_canvas`` in the same kernel."""
    num_rows = confidence.shape[0]
    device = confidence.device
    _check_rows("row_seq", row_seq, num_rows, device)
    has_canvas = canvas is not None
    if has_canvas:
        if positions is None or x0 is None or not canvas.is_contiguous() or canvas.device != device:
            raise ValueError("writing the canvas needs positions and x0, and a contiguous canvas "
                             "on the confidences' device")
        _check_rows("positions", positions, num_rows, device)
        _check_rows("x0", x0, num_rows, device)
    commit = torch.empty(num_rows, dtype=torch.bool, device=device)
    if num_rows == 0:
        return commit
    confidence = confidence.to(torch.float32).contiguous()
    has_threshold = threshold is not None
    _select_kernel[(triton.cdiv(num_rows, SELECT_BLOCK_I),)](
        confidence, row_seq.contiguous(), quota.contiguous(),
        threshold.to(torch.float32).contiguous() if has_threshold else confidence, commit,
        canvas if has_canvas else commit, positions.contiguous() if has_canvas else row_seq,
        x0.contiguous() if has_canvas else row_seq, num_rows,
        HAS_THRESHOLD=has_threshold, HAS_CANVAS=has_canvas,
        BLOCK_I=SELECT_BLOCK_I, BLOCK_J=SELECT_BLOCK_J, num_warps=4,
    )
    return commit
