"""Torch twins of every kernel: the oracle the Triton kernels are tested
against, and the path used on CPU.

The twins define the numerics. In particular the Gumbel noise of sampling is
a pure function of (seed, offset) computed with the same Philox-4x32-10
generator as Triton's ``tl.rand``, so the CPU path, the GPU kernel and the
reference sampler draw bit-identical noise, whatever rows a step computes and
whatever requests share the batch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale: the largest float32 with INT32_MAX * s < 1.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant a and a tensor of
    32-bit values held in int64, without overflowing int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = a_lo * b  # < 2**48
    u = a_hi * b  # < 2**48
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & _MASK32
    return hi, lo


def philox_uint32(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.randint(seed, offset)`` for int64 seeds and offsets
    (broadcast together); returns the random uint32 values held in int64."""
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offset & _MASK32
    c1 = (offset >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, offset)``: float32 uniform in [0, 1)."""
    x = philox_uint32(seed, offset)
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def gumbel_noise(seed: torch.Tensor, row_offset: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise, (num_rows, vocab_size) float32.

    Row r draws from Philox stream ``seed[r]`` at offsets
    ``row_offset[r] * vocab_size + v``: noise depends on nothing but the
    request's seed, the step and the canvas position.
    """
    vocab = torch.arange(vocab_size, dtype=torch.int64, device=seed.device)
    offset = row_offset.to(torch.int64)[:, None] * vocab_size + vocab[None, :]
    u = philox_uniform(seed.to(torch.int64)[:, None], offset)
    return -torch.log(-torch.log(u))


def unmask_scores(
    logits: torch.Tensor,  # (num_rows, vocab)
    temperature: torch.Tensor,  # (num_rows,) float32, 0 = greedy
    seed: torch.Tensor,  # (num_rows,) int64 Philox seed of the row's request and step
    row_offset: torch.Tensor,  # (num_rows,) int64 the row's position in the generated part
    banned_ids: torch.Tensor | None = None,  # (num_banned,) token ids never predicted
    with_margin: bool = False,
    with_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Per row: x0 = argmax(logits / T + Gumbel) (plain argmax where T = 0),
    the softmax probability of x0 under the unscaled logits, and optionally
    the top-1 minus top-2 probability margin and the entropy.

    Returns float32 ``prob`` (and ``margin``/``entropy``) and int64 ``x0``.
    """
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(work_dtype)
    if banned_ids is not None and banned_ids.numel() > 0:
        logits = logits.index_fill(1, banned_ids.to(logits.device), float("-inf"))
    scores = logits
    sampled = temperature > 0
    if bool(sampled.any()):
        rows = sampled.nonzero().squeeze(1)
        noise = gumbel_noise(seed[rows], row_offset[rows], logits.shape[1]).to(work_dtype)
        t = temperature[rows].to(work_dtype)[:, None]
        scores = logits.clone()
        scores[rows] = logits[rows] / t + noise
    x0 = scores.argmax(dim=1)
    log_probs = torch.log_softmax(logits, dim=1)
    out = {"x0": x0, "prob": log_probs.gather(1, x0[:, None]).squeeze(1).exp().float()}
    if with_margin:
        top2 = log_probs.topk(min(2, logits.shape[1]), dim=1).values.exp()
        second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
        out["margin"] = (top2[:, 0] - second).float()
    if with_entropy:
        p = log_probs.exp()
        out["entropy"] = -(p * torch.where(p > 0, log_probs, 0.0)).sum(dim=1).float()
    return out


def varlen_attention(
    q: torch.Tensor,  # (num_q_tokens, num_heads, head_dim)
    k: torch.Tensor,  # (num_k_tokens, num_kv_heads, head_dim)
    v: torch.Tensor,  # (num_k_tokens, num_kv_heads, head_dim)
    cu_seqlens_q: list[int],  # seq -> start of its queries; last = num_q_tokens
    cu_seqlens_k: list[int],  # seq -> start of its current keys; last = num_k_tokens
    k_cache: torch.Tensor | None = None,  # (num_pages, page_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor | None = None,  # (num_pages, page_size, num_kv_heads, head_dim)
    block_table: torch.Tensor | None = None,  # (num_seqs, max_pages) int32 page ids
    cache_seqlens: list[int] | None = None,  # seq -> number of cached keys
    scale: float | None = None,
    causal_block: int | torch.Tensor = 0,  # > 0: block-causal attention over blocks of this many positions;
    # a (num_q_tokens,) int64 tensor: each query token's own sequence's block length
    positions: torch.Tensor | None = None,  # (num_q_tokens,) canvas positions (block-causal only)
    softmax_dtype: torch.dtype | None = None,  # the softmax's dtype when not the scores' (an eager reference's)
) -> torch.Tensor:
    """Non-causal attention over a ragged batch: the queries of sequence i
    attend to its cached keys (if any) and to its current keys, all of them
    (no causal mask: LLaDA is bidirectional). Returns (num_q_tokens,
    num_heads, head_dim) in q's dtype.

    With ``causal_block`` (block-causal models such as LLaDA2), a query at
    position p sees a key at position j only if j // causal_block <=
    p // causal_block; queries and current keys are the same tokens, and
    cached keys are the sequence's positions [0, cache_seqlens[i]).

    Sequences of similar lengths share one padded computation (each
    sequence's keys in its own row, cached ones first, padding masked out),
    so a step costs a few calls per layer, not one per sequence;
    ``attention_groups`` bounds the padding. The gather indices depend only
    on the lengths and the block table, so every layer of a step reuses the
    plan the first layer built."""
    num_seqs = len(cu_seqlens_q) - 1
    use_cache = k_cache is not None and cache_seqlens is not None and any(cache_seqlens)
    cached = tuple(map(int, cache_seqlens)) if use_cache else (0,) * num_seqs
    table = tuple(map(tuple, block_table.tolist())) if use_cache else None
    page_size = k_cache.shape[1] if use_cache else 0
    plan = _attention_plan(tuple(map(int, cu_seqlens_q)), tuple(map(int, cu_seqlens_k)), cached, table, page_size,
                           str(q.device))
    out = torch.empty_like(q)
    for g in plan:
        if g.batch == 1:  # plain slices, no padding
            queries, keys, values = q[g.q0:g.q1][None], k[g.k0:g.k1][None], v[g.k0:g.k1][None]
            if g.cache_src is not None:
                keys = torch.cat([k_cache.flatten(0, 1).index_select(0, g.cache_src)[None], keys], dim=1)
                values = torch.cat([v_cache.flatten(0, 1).index_select(0, g.cache_src)[None], values], dim=1)
        else:
            queries = q.index_select(0, g.q_src).unflatten(0, (g.batch, -1))  # (batch, max_q, heads, dim)
            if g.cache_src is None:
                keys, values = k.index_select(0, g.k_src), v.index_select(0, g.k_src)
            else:  # the cached slots, then the current keys copied over their slots
                keys = k_cache.flatten(0, 1).index_select(0, g.cache_src)
                values = v_cache.flatten(0, 1).index_select(0, g.cache_src)
                k_cur, v_cur = (k, v) if g.cur_src is None else (k.index_select(0, g.cur_src), v.index_select(0, g.cur_src))
                keys.index_copy_(0, g.cur_dst, k_cur)
                values.index_copy_(0, g.cur_dst, v_cur)
            keys, values = keys.unflatten(0, (g.batch, -1)), values.unflatten(0, (g.batch, -1))
        mask = g.key_mask
        if isinstance(causal_block, torch.Tensor) or causal_block:
            q_pos = positions.index_select(0, g.q_src).view(g.batch, -1)
            k_pos = torch.where(g.is_cached, g.key_slot, positions.index_select(0, g.k_src).view(g.batch, -1))
            cb = causal_block
            if isinstance(cb, torch.Tensor):  # each sequence its own block length: (batch, 1, 1)
                cb = cb.index_select(0, g.q_src).view(g.batch, -1)[:, :1, None]
            mask = (k_pos[:, None, :] // cb) <= (q_pos[:, :, None] // cb)
            mask = mask if g.key_mask is None else mask & g.key_mask
        o = _softmax_attention(queries, keys, values, mask, scale, softmax_dtype)  # (batch, max_q, heads, dim)
        if g.batch == 1:
            out[g.q0:g.q1] = o[0]
        else:
            out.index_copy_(0, g.out_rows, o.flatten(0, 1).index_select(0, g.out_src))
    return out


@dataclass(frozen=True)
class _Group:
    """The gather indices of one group of sequences attended together. Query
    padding reads the sequence's first query; key padding reads a real key
    (a current one, or with a cache the first cached slot of the group), so
    every padded value is finite before the mask removes it."""

    batch: int  # sequences in the group
    q_src: torch.Tensor  # (batch * max_q,) rows of q
    k_src: torch.Tensor  # (batch * max_k,) rows of k
    cache_src: torch.Tensor | None  # slots in the flattened cache: (batch * max_k,), or (n,) when batch == 1
    cur_src: torch.Tensor | None  # with a cache: the group's rows of k (None: all of them, in order) ...
    cur_dst: torch.Tensor | None  # ... and the (batch * max_k) slots they take
    is_cached: torch.Tensor  # (batch, max_k) bool: the slot holds a cached key
    key_slot: torch.Tensor  # (1, max_k) slot index j (a cached key's canvas position)
    key_mask: torch.Tensor | None  # (batch, 1, max_k) bool keys that exist; None = all do
    out_rows: torch.Tensor | None  # (num_queries,) rows of out ...
    out_src: torch.Tensor | None  # ... and the (batch * max_q) rows they come from
    q0: int = 0  # batch == 1: the sequence's query and current-key spans
    q1: int = 0
    k0: int = 0
    k1: int = 0


@functools.lru_cache(maxsize=8)
def _attention_plan(cu_q: tuple[int, ...], cu_k: tuple[int, ...], cached: tuple[int, ...],
                    table: tuple[tuple[int, ...], ...] | None, page_size: int, device: str) -> tuple[_Group, ...]:
    num_seqs = len(cu_q) - 1
    q_lens = [cu_q[i + 1] - cu_q[i] for i in range(num_seqs)]
    k_lens = [cached[i] + cu_k[i + 1] - cu_k[i] for i in range(num_seqs)]

    def tensor(values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    plan = []
    for group in attention_groups(q_lens, k_lens):
        batch = len(group)
        max_q, max_k = max(q_lens[i] for i in group), max(k_lens[i] for i in group)
        q_src, k_src, cache_src, is_cached, key_valid, out_rows, out_src = [], [], [], [], [], [], []
        cur = []  # (row of k, its slot) of the group's current keys
        # Padding reads a cached key that exists (finite), then is masked.
        filler = next((table[i][0] * page_size for i in group if cached[i]), 0)
        for b, i in enumerate(group):
            n, any_key = cached[i], cu_k[i] if cu_k[i + 1] > cu_k[i] else 0
            q_src += [*range(cu_q[i], cu_q[i + 1])] + [cu_q[i]] * (max_q - q_lens[i])
            k_src += [any_key] * n + [*range(cu_k[i], cu_k[i + 1])] + [any_key] * (max_k - k_lens[i])
            cache_src += [table[i][j // page_size] * page_size + j % page_size for j in range(n)]
            cache_src += [] if batch == 1 else [filler] * (max_k - n)
            cur += [(r, b * max_k + n + r - cu_k[i]) for r in range(cu_k[i], cu_k[i + 1])]
            is_cached += [True] * n + [False] * (max_k - n)
            key_valid += [True] * k_lens[i] + [False] * (max_k - k_lens[i])
            out_rows += range(cu_q[i], cu_q[i + 1])
            out_src += range(b * max_q, b * max_q + q_lens[i])
        key_mask = None if all(key_valid) else tensor(key_valid, torch.bool).view(batch, 1, max_k)
        spans = (cu_q[group[0]], cu_q[group[0] + 1], cu_k[group[0]], cu_k[group[0] + 1]) if batch == 1 else ()
        any_cached = any(cached[i] for i in group)
        cur.sort()
        cur_src = None if [r for r, _ in cur] == list(range(cu_k[-1])) else tensor([r for r, _ in cur])
        plan.append(_Group(
            batch, tensor(q_src), tensor(k_src), tensor(cache_src) if any_cached else None,
            cur_src if any_cached else None, tensor([d for _, d in cur]) if any_cached else None,
            tensor(is_cached, torch.bool).view(batch, max_k), torch.arange(max_k, device=device)[None], key_mask,
            None if batch == 1 else tensor(out_rows), None if batch == 1 else tensor(out_src), *spans))
    return tuple(plan)  # shared by every caller with these lengths: not to be changed


def attention_groups(q_lens: list[int], k_lens: list[int], max_waste: float = 2.0) -> list[list[int]]:
    """Splits sequences into groups that share one padded attention call.
    Sorted by key length, a group takes the next sequence while the group's
    padded work (size x longest queries x longest keys) stays within
    ``max_waste`` times its real work and every member's padded share
    within ``2 * max_waste`` times its own (so one short sequence never
    rides with a long one). Sequences without queries are left out."""
    order = sorted((i for i in range(len(q_lens)) if q_lens[i]), key=lambda i: (-k_lens[i], -q_lens[i]))
    groups: list[list[int]] = []
    work = max_q = min_row = 0
    for i in order:
        row = q_lens[i] * k_lens[i]
        if groups:
            g_work, g_q, g_min = work + row, max(max_q, q_lens[i]), min(min_row, row)
            g_row = g_q * k_lens[groups[-1][0]]  # the padded (queries x keys) of every member
            if (len(groups[-1]) + 1) * g_row <= max_waste * g_work and g_row <= 2 * max_waste * g_min:
                groups[-1].append(i)
                work, max_q, min_row = g_work, g_q, g_min
                continue
        groups.append([i])
        work, max_q, min_row = row, q_lens[i], row
    return groups


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None, softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q: (batch, num_q, heads, dim); k, v: (batch, num_k, kv_heads, dim);
    mask: None or bool broadcastable to (batch, num_q, num_k), true = attend.
    Returns (batch, num_q, heads, dim).

    Scores, softmax and the weighted sum as two batched GEMMs: at the sizes a
    denoising step has on CPU (tens of queries and keys per sequence) this is
    about twice as fast as SDPA's flash kernel and equal to it up to float
    rounding. 16-bit inputs are computed in float32 (products, softmax and
    weighted sum), float64 in float64."""
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    out_dtype = q.dtype
    if q.dtype not in (torch.float32, torch.float64):  # 16-bit inputs: products and sums in float32
        q, k, v = q.float(), k.float(), v.float()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if num_kv_heads != num_heads:
        kh, vh = kh.repeat_interleave(num_heads // num_kv_heads, 1), vh.repeat_interleave(num_heads // num_kv_heads, 1)
    scores = torch.matmul(qh, kh.transpose(-1, -2))  # (batch, heads, num_q, num_k)
    scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(scores.dtype), vh)
    return o.transpose(1, 2).to(out_dtype)


def select_commits(
    confidence: torch.Tensor,  # (num_rows,) float32; -inf rows are never committed by quota
    row_seq: torch.Tensor,  # (num_rows,) int64 row -> sequence index in [0, num_seqs)
    quota: torch.Tensor,  # (num_seqs,) int64 tokens to commit this step (quota rule)
    threshold: torch.Tensor | None = None,  # (num_seqs,) float32; > 0 selects the threshold rule
) -> torch.Tensor:
    """Which rows to commit, (num_rows,) bool, per sequence:
    - quota rule (threshold <= 0 or None): its ``quota`` most confident rows;
    - threshold rule: every row with confidence >= threshold, and at least
      its most confident row.
    Ties go to the lower row index (rows are in canvas order within a
    sequence). No host synchronisation."""
    num_rows = confidence.shape[0]
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.bool, device=confidence.device)
    # Group rows by sequence, most confident first, stable so ties keep row order.
    order = torch.sort(confidence, descending=True, stable=True).indices
    order = order[torch.sort(row_seq[order], stable=True).indices]
    seq_sorted = row_seq[order]
    counts = torch.bincount(row_seq, minlength=quota.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_rows, device=confidence.device) - starts[seq_sorted]
    take = rank < quota[seq_sorted]
    if threshold is not None:
        by_threshold = threshold[seq_sorted] > 0
        take_t = (confidence[order] >= threshold[seq_sorted]) | (rank == 0)
        take = torch.where(by_threshold, take_t, take)
    commit = torch.zeros(num_rows, dtype=torch.bool, device=confidence.device)
    commit[order] = take
    return commit


def commit_to_canvas(
    canvas: torch.Tensor,  # any shape, contiguous token ids; written in place
    positions: torch.Tensor,  # (num_rows,) int64 row -> flat index into canvas
    x0: torch.Tensor,  # (num_rows,) int64 row -> predicted token
    commit: torch.Tensor,  # (num_rows,) bool rows to commit
) -> torch.Tensor:
    """canvas.view(-1)[positions[r]] = x0[r] for every committed row r, in
    place and without host synchronisation. Returns canvas."""
    flat = canvas.view(-1)
    flat.index_put_((positions,), torch.where(commit, x0.to(canvas.dtype), flat[positions]))
    return canvas


def fused_moe(
    x: torch.Tensor,  # (num_tokens, hidden)
    w_gate_up: torch.Tensor,  # (num_experts, 2 * intermediate, hidden): gate rows, then up rows
    w_down: torch.Tensor,  # (num_experts, hidden, intermediate)
    topk_ids: torch.Tensor,  # (num_tokens, top_k) int64 experts chosen per token
    topk_weights: torch.Tensor,  # (num_tokens, top_k) their weights
) -> torch.Tensor:
    """Mixture of SwiGLU experts: out[t] = sum_k w[t, k] * down_e(silu(gate_e
    x[t]) * up_e x[t]) with e = topk_ids[t, k]. (num_tokens, hidden) in x's
    dtype. The experts compute in x's dtype; the weighted combine runs in
    ``topk_weights``' dtype (LLaDA2's reference combines in float32 whatever
    the model dtype, LLaDA-MoE's in the model dtype), summed over k in order.

    Tokens are grouped by expert (a stable sort of the (token, k) pairs), one
    GEMM pair per expert that got any; an expert with no tokens costs nothing."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # (num_tokens * top_k,) pairs grouped by expert
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    inter = w_down.shape[2]
    y = x.new_empty(num_tokens * top_k, x.shape[1])  # (pair, hidden) expert outputs
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        gate_up = x.index_select(0, pairs // top_k) @ w_gate_up[e].t()  # (n, 2 * intermediate)
        y[pairs] = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down[e].t()
    w = topk_weights
    return (y.view(num_tokens, top_k, -1).to(w.dtype) * w[..., None]).sum(dim=1).to(x.dtype)
