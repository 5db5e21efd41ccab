"""Fused non-causal attention over a ragged batch, with an optional paged KV
cache: the Triton twin of ``kernels.reference.varlen_attention``.

Promises: the same result as the twin (to float rounding) for float32,
float16 and bfloat16 inputs, GQA (num_kv_heads divides num_heads) and any
head_dim up to 256 (padded to a power of two >= 16 in registers). Scores
never reach memory: each program takes one tile of one sequence's queries
for one head and streams that sequence's keys (its cached pages first, then
its current tokens) through an online softmax (FlashAttention). Pages whose
size is a power of two >= 16 are read a tile at a time from one page; other
sizes work too, with one page lookup per key. Batches too small to fill the
GPU split each sequence's keys over several programs and merge their partial
softmaxes in a second kernel (flash-decoding), so that a 32-token block over
4k cached keys still uses every SM.

Numerics: softmax, rescaling and accumulation run in float32. Dot operands
stay in the storage dtype on CUDA (16-bit products are exact, accumulation is
float32); float32 inputs use IEEE float32 dots (no TF32). Without CUDA (the
Triton interpreter, ``TRITON_INTERPRET=1``) bfloat16 loads are cast to
float32 before any arithmetic, because the interpreter computes bfloat16
wrongly; float16 keeps its GPU path there.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256
LOG2_E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, is_key, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax update with a (BLOCK_N, BLOCK_D) tile of keys and
    values; m_i and l_i are the running row max (log2 units) and row sum."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    s = tl.where(is_key[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    kc_ptr, vc_ptr, bt_ptr,
    cu_q_ptr, cu_k_ptr, cache_len_ptr, tile_seq_ptr, tile_m_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_os, stride_ls, stride_lt,
    stride_kcp, stride_kcs, stride_kch, stride_vcp, stride_vcs, stride_vch, stride_bt,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_CACHE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    m0 = tl.load(tile_m_ptr + tile)  # first query of the tile, within its sequence
    q_beg = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_beg
    k_beg = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_beg
    num_cached = 0
    if HAS_CACHE:
        num_cached = tl.load(cache_len_ptr + seq)
    kv_head = (head // GROUP).to(tl.int64)  # x a head's stride of a large pool: past 2^31 elements

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # head_dim padded to a power of two
    is_dim = offs_d < HEAD_DIM
    is_query = offs_m < q_len
    # Scalar 64-bit bases plus small 32-bit tile offsets keep addresses cheap.
    q_base = q_ptr + (q_beg + m0).to(tl.int64) * stride_qt + head * stride_qh
    q_tile = tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_base + q_tile, mask=is_query[:, None] & is_dim[None, :],
                other=0.0).to(DOT_DTYPE)  # (BLOCK_M, BLOCK_D)

    # Keys are numbered 0..num_keys-1: cached keys first, then current ones.
    # This split covers [lo, hi), a whole number of BLOCK_N tiles.
    num_keys = num_cached + k_len
    per_split = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), NUM_SPLITS) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_keys)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_CACHE:
        cache_hi = tl.minimum(hi, num_cached)
        for start in range(lo, cache_hi, BLOCK_N):
            is_key = start + offs_n < cache_hi
            kv_mask = is_key[:, None] & is_dim[None, :]
            if PAGE_SIZE % BLOCK_N == 0:
                # start is a multiple of BLOCK_N, so the tile lies in one page: scalar bases.
                page = tl.load(bt_ptr + seq * stride_bt + start // PAGE_SIZE).to(tl.int64)
                slot = start % PAGE_SIZE
                kc_base = kc_ptr + page * stride_kcp + slot * stride_kcs + kv_head * stride_kch
                vc_base = vc_ptr + page * stride_vcp + slot * stride_vcs + kv_head * stride_vch
                kc_offs = offs_n[:, None] * stride_kcs + offs_d[None, :]
                vc_offs = offs_n[:, None] * stride_vcs + offs_d[None, :]
            else:  # pages smaller than a tile, or of odd sizes: one page lookup per key
                pos = start + offs_n
                page = tl.load(bt_ptr + seq * stride_bt + pos // PAGE_SIZE, mask=is_key, other=0).to(tl.int64)
                kc_base = kc_ptr + kv_head * stride_kch
                vc_base = vc_ptr + kv_head * stride_vch
                kc_offs = (page * stride_kcp + (pos % PAGE_SIZE) * stride_kcs)[:, None] + offs_d[None, :]
                vc_offs = (page * stride_vcp + (pos % PAGE_SIZE) * stride_vcs)[:, None] + offs_d[None, :]
            k = tl.load(kc_base + kc_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
            v = tl.load(vc_base + vc_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, is_key, qk_scale, PRECISION)
    k_tile = offs_n[:, None] * stride_kt + offs_d[None, :]
    v_tile = offs_n[:, None] * stride_vt + offs_d[None, :]
    for start in range(tl.maximum(lo, num_cached), hi, BLOCK_N):
        is_key = start + offs_n < hi
        row = (k_beg + start - num_cached).to(tl.int64)
        kv_mask = is_key[:, None] & is_dim[None, :]
        k = tl.load(k_ptr + row * stride_kt + kv_head * stride_kh + k_tile,
                    mask=kv_mask, other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + row * stride_vt + kv_head * stride_vh + v_tile,
                    mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, is_key, qk_scale, PRECISION)

    has_keys = l_i > 0  # an empty split leaves its rows without keys
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_base = o_ptr + split.to(tl.int64) * stride_os + (q_beg + m0).to(tl.int64) * stride_ot + head * stride_oh
    o_tile = tl.arange(0, BLOCK_M)[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_base + o_tile, out.to(o_ptr.dtype.element_ty), mask=is_query[:, None] & is_dim[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # log2 of the softmax sum
        lse_base = lse_ptr + split.to(tl.int64) * stride_ls + (q_beg + m0).to(tl.int64) * stride_lt + head
        tl.store(lse_base + tl.arange(0, BLOCK_M) * stride_lt, lse, mask=is_query)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, o_ptr,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Weights each split's normalised output by its share of the softmax sum."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, BLOCK_D)
    is_dim = offs_d < HEAD_DIM
    is_split = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + offs_s * stride_ls + row * stride_lt + head, mask=is_split,
                  other=float("-inf"))  # (SPLITS_POW2,)
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    part = tl.load(part_ptr + offs_s[:, None] * stride_ps + row * stride_pt + head * stride_ph + offs_d[None, :],
                   mask=is_split[:, None] & is_dim[None, :], other=0.0)  # (SPLITS_POW2, BLOCK_D)
    out = tl.sum(part * weight[:, None], 0)
    tl.store(o_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=is_dim)


_meta_cache: dict[tuple, tuple[torch.Tensor, int]] = {}


def _as_list(x: list[int] | torch.Tensor) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else [int(i) for i in x]


def _metadata(cu_q: list[int], cu_k: list[int], cache_lens: list[int] | None, block_m: int,
              device: torch.device) -> tuple[torch.Tensor, int]:
    """One int32 device buffer holding cu_q, cu_k, cache lengths and, per
    query tile, its sequence and first query; copied once per distinct batch
    (a forward calls attention once per layer with the same batch)."""
    key = (tuple(cu_q), tuple(cu_k), None if cache_lens is None else tuple(cache_lens), block_m, device)
    if key not in _meta_cache:
        num_seqs = len(cu_q) - 1
        tile_seq, tile_m = [], []
        for i in range(num_seqs):
            starts = range(0, cu_q[i + 1] - cu_q[i], block_m)
            tile_seq += [i] * len(starts)
            tile_m += list(starts)
        lens = cache_lens if cache_lens is not None else [0] * num_seqs
        host = torch.tensor(cu_q + cu_k + lens + tile_seq + tile_m, dtype=torch.int32)
        if device.type == "cuda":
            host = host.pin_memory()
        _meta_cache.clear()
        _meta_cache[key] = (host.to(device, non_blocking=True), len(tile_seq))
    return _meta_cache[key]


def _check(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, device: torch.device) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} like q, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim, got strides {t.stride()}")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    """Enough key splits to give every SM about two programs, none shorter
    than MIN_KEYS_PER_SPLIT keys."""
    if device.type != "cuda":
        return 1
    num_sms = _num_sms(device.index)
    if num_programs >= num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, num_programs)
    return max(1, min(MAX_SPLITS, wanted, max_keys // MIN_KEYS_PER_SPLIT))


def _launch_config(block_d: int, max_q: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles for head_dim padded to block_d and sequences of at most max_q
    queries, chosen from ptxas resource counts on sm_90 (no spills); IEEE
    float32 dots need small tiles to stay in registers."""
    if dtype == torch.float32:
        if block_d <= 64:
            return {"block_m": 32, "block_n": 32, "num_warps": 8, "num_stages": 2}
        return {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 2}
    block_m = min(128 if block_d <= 128 else 64, max(16, triton.next_power_of_2(max_q)))
    return {"block_m": block_m, "block_n": 64 if block_d <= 128 else 32,
            "num_warps": 8 if block_m >= 128 or block_d > 128 else 4, "num_stages": 3}


def _interpreter_config(max_q: int) -> dict[str, int]:
    """Off CUDA (the interpreter runs programs one after another, each tile
    op a numpy call): whole sequences of queries in one tile and long key
    tiles, so fewer, larger numpy ops; cached keys then take the per-key
    page lookup, a plain gather there."""
    return {"block_m": min(128, max(16, triton.next_power_of_2(max_q))), "block_n": 128,
            "num_warps": 4, "num_stages": 1}


def varlen_attention(
    q: torch.Tensor,  # (num_q_tokens, num_heads, head_dim)
    k: torch.Tensor,  # (num_k_tokens, num_kv_heads, head_dim)
    v: torch.Tensor,  # (num_k_tokens, num_kv_heads, head_dim)
    cu_seqlens_q: list[int] | torch.Tensor,  # (num_seqs + 1,) query starts; last = num_q_tokens
    cu_seqlens_k: list[int] | torch.Tensor,  # (num_seqs + 1,) current key starts; last = num_k_tokens
    k_cache: torch.Tensor | None = None,  # (num_pages, page_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor | None = None,  # (num_pages, page_size, num_kv_heads, head_dim)
    block_table: torch.Tensor | None = None,  # (num_seqs, max_pages) int32 page ids
    cache_seqlens: list[int] | torch.Tensor | None = None,  # (num_seqs,) cached keys per sequence
    scale: float | None = None,
    num_splits: int | None = None,  # key splits per query tile; None = chosen for the GPU
    block_m: int | None = None,  # query tile; None = chosen from the shapes
    block_n: int | None = None,  # key tile; None = chosen from the shapes
) -> torch.Tensor:
    """Triton version of ``kernels.reference.varlen_attention`` (same
    arguments and result; the last three tune the launch). cu_seqlens given
    as tensors are read back to the host once."""
    num_q_tokens, num_heads, head_dim = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    _check("q", q, 3, q.dtype, q.device)
    _check("k", k, 3, q.dtype, q.device)
    _check("v", v, 3, q.dtype, q.device)
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[2] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with head_dim "
                         f"{head_dim} and a head count dividing {num_heads}")
    cu_q, cu_k = _as_list(cu_seqlens_q), _as_list(cu_seqlens_k)
    num_seqs = len(cu_q) - 1
    if len(cu_k) != num_seqs + 1 or cu_q[-1] != num_q_tokens or cu_k[-1] != k.shape[0]:
        raise ValueError(f"cu_seqlens_q must end at {num_q_tokens} and cu_seqlens_k at {k.shape[0]}, "
                         f"both with num_seqs + 1 entries; got {len(cu_q)} and {len(cu_k)} entries")
    has_cache = k_cache is not None
    cache_lens = None
    if has_cache:
        if v_cache is None or block_table is None or cache_seqlens is None:
            raise ValueError("a KV cache needs k_cache, v_cache, block_table and cache_seqlens")
        _check("k_cache", k_cache, 4, q.dtype, q.device)
        _check("v_cache", v_cache, 4, q.dtype, q.device)
        if k_cache.shape != v_cache.shape or k_cache.shape[2:] != (num_kv_heads, head_dim):
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                             f"must be (num_pages, page_size, {num_kv_heads}, {head_dim})")
        if block_table.ndim != 2 or block_table.shape[0] != num_seqs or block_table.dtype != torch.int32:
            raise ValueError(f"block_table must be int32 (num_seqs={num_seqs}, max_pages), "
                             f"got {block_table.dtype} {tuple(block_table.shape)}")
        if block_table.device != q.device or block_table.stride(1) != 1:
            raise ValueError("block_table must be on q's device and contiguous in its pages")
        cache_lens = _as_list(cache_seqlens)
        page_size = k_cache.shape[1]
        if len(cache_lens) != num_seqs or max(cache_lens, default=0) > block_table.shape[1] * page_size:
            raise ValueError(f"cache_seqlens needs {num_seqs} entries, each within the block table")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "triton is imported)")

    max_q = max((cu_q[i + 1] - cu_q[i] for i in range(num_seqs)), default=0)
    block_m, block_n, config = _tiles(block_d, max_q, q, k_cache, block_m, block_n)
    meta, num_tiles = _metadata(cu_q, cu_k, cache_lens, block_m, q.device)
    out = torch.empty_like(q)
    if num_tiles == 0:
        return out
    max_keys = max((cu_k[i + 1] - cu_k[i] + (cache_lens[i] if has_cache else 0) for i in range(num_seqs)))
    if num_splits is None:
        num_splits = _num_splits(num_tiles * num_heads, max_keys, q.device)
    s = num_seqs
    _launch(q, k, v, out, k_cache, v_cache, block_table, meta, meta[s + 1:], meta[2 * s + 2:], meta[3 * s + 2:],
            meta[3 * s + 2 + num_tiles:], num_tiles, num_splits, block_m, block_n, config, scale)
    return out


_static_meta: dict[tuple, torch.Tensor] = {}


def static_attention(
    q: torch.Tensor,  # (num_seqs * width, num_heads, head_dim): sequence i in rows [i * width, (i + 1) * width)
    k: torch.Tensor,  # (num_seqs * width, num_kv_heads, head_dim): its current keys, the same rows
    v: torch.Tensor,  # (num_seqs * width, num_kv_heads, head_dim)
    k_cache: torch.Tensor,  # (num_pages, page_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,  # (num_pages, page_size, num_kv_heads, head_dim)
    block_table: torch.Tensor,  # (num_seqs, max_pages) int32 page ids; entries past a sequence's keys unread
    cache_seqlens: torch.Tensor,  # (num_seqs,) int32 cached keys per sequence, read on the device only
    scale: float | None = None,
    block_m: int | None = None,  # query tile; None = chosen from the shapes
    block_n: int | None = None,  # key tile; None = chosen from the shapes
) -> torch.Tensor:
    """``varlen_attention`` for a batch of equal-width sequences whose
    lengths live on the device: what a captured CUDA graph can replay. The
    host work (grid, tiles, key splits, the tile metadata) depends on the
    shapes alone, so a replay with new cached lengths and block tables
    launches exactly what the capture launched. Key splits are chosen for
    the most keys the table can hold; each sequence divides its own keys
    over them, and splits left empty exit at once."""
    num_seqs, max_pages = block_table.shape
    num_q_tokens, num_heads, head_dim = q.shape
    if q.dtype not in SUPPORTED_DTYPES or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q must be one of {SUPPORTED_DTYPES} with head_dim in [1, {MAX_HEAD_DIM}], "
                         f"got {q.dtype} {tuple(q.shape)}")
    for name, t, ndim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        _check(name, t, ndim, q.dtype, q.device)
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != num_q_tokens or k.shape[2] != head_dim or num_heads % num_kv_heads \
            or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {tuple(k.shape)}, v, k_cache {tuple(k_cache.shape)}, v_cache must match q "
                         f"{tuple(q.shape)}")
    if not num_seqs or num_q_tokens % num_seqs:
        raise ValueError(f"{num_q_tokens} tokens do not split into {num_seqs} sequences of one width")
    for name, t, shape in (("block_table", block_table, (num_seqs, max_pages)), ("cache_seqlens", cache_seqlens,
                                                                                 (num_seqs,))):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != q.device or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 {shape} on {q.device}, contiguous; got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "triton is imported)")
    width = num_q_tokens // num_seqs
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, config = _tiles(block_d, width, q, k_cache, block_m, block_n)
    key = (num_seqs, width, block_m, q.device)
    if key not in _static_meta:  # made at a warm-up run, before any capture; kept for the graphs' lifetime
        starts = list(range(0, width, block_m))
        cu = [i * width for i in range(num_seqs + 1)]
        host = torch.tensor(cu + [i for i in range(num_seqs) for _ in starts] + starts * num_seqs, dtype=torch.int32)
        _static_meta[key] = host.to(q.device)
    meta = _static_meta[key]
    num_tiles = num_seqs * -(-width // block_m)
    max_keys = max_pages * k_cache.shape[1] + width
    num_splits = _num_splits(num_tiles * num_heads, max_keys, q.device)
    out = torch.empty_like(q)
    tiles = meta[num_seqs + 1:]
    _launch(q, k, v, out, k_cache, v_cache, block_table, meta, meta, cache_seqlens, tiles, tiles[num_tiles:],
            num_tiles, num_splits, block_m, block_n, config, scale)
    return out


def _tiles(block_d: int, max_q: int, q: torch.Tensor, k_cache: torch.Tensor | None, block_m: int | None,
           block_n: int | None) -> tuple[int, int, dict[str, int]]:
    """(block_m, block_n, launch config): the given tiles, else chosen from the shapes."""
    is_cuda = q.device.type == "cuda"
    config = _launch_config(block_d, max_q, q.dtype) if is_cuda else _interpreter_config(max_q)
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    page_size = 0 if k_cache is None else k_cache.shape[1]
    if is_cuda and page_size and page_size % block_n and page_size >= 16 and page_size & (page_size - 1) == 0:
        block_n = page_size  # a key tile within one page (a power of two below block_n)
    return block_m, block_n, config


def _launch(q, k, v, out, k_cache, v_cache, block_table, cu_q, cu_k, cache_lens, tile_seq, tile_m,
            num_tiles: int, num_splits: int, block_m: int, block_n: int, config: dict[str, int],
            scale: float | None) -> None:
    """The attention kernel (and the split merge) over device metadata:
    ``cu_q``, ``cu_k`` (num_seqs + 1,), ``cache_lens`` (num_seqs,) and per
    query tile ``tile_seq`` / ``tile_m`` (num_tiles,), all int32; nothing
    here reads them on the host."""
    num_q_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    is_cuda = q.device.type == "cuda"
    has_cache = k_cache is not None
    if num_splits > 1:
        part = torch.empty((num_splits, num_q_tokens, num_heads, head_dim), device=q.device,
                           dtype=torch.float32)
        lse = torch.empty((num_splits, num_q_tokens, num_heads), device=q.device, dtype=torch.float32)
    else:
        part, lse = out[None], out  # lse unused with one split
    page_size = k_cache.shape[1] if has_cache else 1
    if not has_cache:
        k_cache = v_cache = k[None]  # unused placeholders with the right rank
        block_table = cu_q[None]
    # The interpreter's bfloat16 arithmetic is wrong: there, bf16 dots run in float32.
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16 if is_cuda else tl.float32}
    dot_dtype = dot_dtype.get(q.dtype, tl.float32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    _attention_kernel[(num_tiles, num_heads, num_splits)](
        q, k, v, part, lse, k_cache, v_cache, block_table,
        cu_q, cu_k, cache_lens, tile_seq, tile_m,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        part.stride(1), part.stride(2), part.stride(0), lse.stride(0), lse.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        scale * LOG2_E,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE_SIZE=page_size, HAS_CACHE=has_cache, NUM_SPLITS=num_splits,
        DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_q_tokens, num_heads)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            BLOCK_D=block_d,
        )


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs and knobs.runtime.interpret)
