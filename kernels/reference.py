"""Torch twins of every kernel: the oracle the Triton kernels are tested
against, and the path used on CPU.

The twins define the numerics. In particular the Gumbel noise of sampling is
a pure function of (seed, offset) computed with the same Philox-4x32-10
generator as Triton's ``tl.rand``, so the CPU path, the GPU kernel and the
reference sampler draw bit-identical noise, whatever rows a step computes and
whatever requests share the batch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from kernels import attention_plan
from kernels.attention_plan import attention_groups  # noqa: F401 - part of the twin's interface

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


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=1)``, int64 (num_rows,): the first index of each row's
    maximum (NaN counts as the maximum, as in torch). On CPU numpy's
    vectorized argmax computes it: torch's row-wise argmax is a scalar loop
    there, some 10x slower over a vocabulary (a fixed cost of every step)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[1] > 0:
        return torch.from_numpy(x.detach().numpy().argmax(axis=1))
    return x.argmax(dim=1)


def row_pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.gather(1, index[:, None]).squeeze(1)``: x[r, index[r]] for every
    row r, (num_rows,). On CPU numpy's fancy index copies the same values:
    torch's gather and the views around it cost several times more there
    (host time per step)."""
    if x.is_cpu and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(x.detach().numpy()[np.arange(x.shape[0]), index.numpy()])
    return x.gather(1, index[:, None]).squeeze(1)


def unmask_scores(
    logits: torch.Tensor,  # (num_rows, vocab)
    temperature: torch.Tensor,  # (num_rows,) float32, 0 = greedy
    seed: torch.Tensor,  # (num_rows,) int64 Philox seed of the row's request and step
    row_offset: torch.Tensor,  # (num_rows,) int64 the row's position in the generated part
    banned_ids: torch.Tensor | None = None,  # (num_banned,) token ids never predicted
    with_margin: bool = False,
    with_entropy: bool = False,
    any_sampled: bool | None = None,  # whether some row has T > 0, when the caller knows it on the host;
    # None = read from temperature (a device sync, and a few torch ops: host time per step)
) -> dict[str, torch.Tensor]:
    """Per row: x0 = argmax(logits / T + Gumbel) (plain argmax where T = 0),
    the softmax probability of x0 under the unscaled logits, and optionally
    the top-1 minus top-2 probability margin and the entropy.

    Returns float32 ``prob`` (and ``margin``/``entropy``) and int64 ``x0``.
    """
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = _as(logits, work_dtype)
    if banned_ids is not None and banned_ids.numel() > 0:
        logits = logits.index_fill(1, banned_ids.to(logits.device), float("-inf"))
    scores = logits
    if any_sampled if any_sampled is not None else bool((temperature > 0).any()):
        rows = (temperature > 0).nonzero().squeeze(1)
        noise = gumbel_noise(seed[rows], row_offset[rows], logits.shape[1]).to(work_dtype)
        t = temperature[rows].to(work_dtype)[:, None]
        scores = logits.clone()
        scores[rows] = logits[rows] / t + noise
    x0 = row_argmax(scores)
    log_probs = torch.log_softmax(logits, dim=1)
    out = {"x0": x0, "prob": _as(row_pick(log_probs, x0).exp(), torch.float32)}
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
    cached_kv: Callable[[], tuple[torch.Tensor | None, ...]] | None = None,  # gives this layer's cached keys
    # and values already gathered: per group of the key plan, (2, num_kv_heads, batch * max_k, head_dim)
    key_plan: Callable[[], attention_plan.KeyPlan] | None = None,  # gives the step's key plan, made once for
    # every layer (else it is looked up from the arguments)
) -> torch.Tensor:
    """Non-causal attention over a ragged batch: the queries of sequence i
    attend to its cached keys (if any) and to its current keys, all of them
    (no causal mask: LLaDA is bidirectional). Returns (num_q_tokens,
    num_heads, head_dim) in q's dtype.

    With ``causal_block`` (block-causal models such as LLaDA2), a query at
    position p sees a key at position j only if j // causal_block <=
    p // causal_block; queries and current keys are the same tokens, and
    cached keys are the sequence's positions [0, cache_seqlens[i]).

    Sequences of similar lengths share one padded computation
    (``kernels.attention_plan``: built once per step, shared by every
    layer), so a step costs two batched products per group and layer, not
    one per sequence, and grouped-query heads share their keys without
    copies. ``cached_kv`` (from a forward pass's one
    ``attention_plan.gather_cached`` of every layer) replaces the per-layer
    gather from the pages. 16-bit inputs are computed in float32 (products,
    softmax and weighted sum), float64 in float64."""
    use_cache = k_cache is not None and cache_seqlens is not None and any(cache_seqlens)
    if key_plan is not None:
        keys_plan = key_plan()
    else:
        keys_plan = attention_plan.plan_keys(cu_seqlens_k, cache_seqlens if use_cache else None, block_table,
                                             k_cache.shape[1] if use_cache else 0, q.device)
    queries_plan = attention_plan.query_plan(keys_plan, tuple(map(int, cu_seqlens_q)), str(q.device))
    gathered = cached_kv() if use_cache and cached_kv is not None else None
    if use_cache and gathered is None:
        pool = torch.stack((attention_plan.head_major_slots(k_cache), attention_plan.head_major_slots(v_cache)))
        gathered = tuple(None if g is None else g[:, 0]
                         for g in attention_plan.gather_cached(keys_plan, pool[:, None]))
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv_heads
    work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.view(q.shape[0], num_kv_heads, group, head_dim).permute(1, 0, 2, 3)  # (kv_heads, tokens, group, dim)
    k_hm, v_hm = k.permute(1, 0, 2), v.permute(1, 0, 2)  # (kv_heads, tokens, dim) views
    out = torch.empty_like(q)
    out_g = out.view(q.shape[0], num_kv_heads, group, head_dim)
    for i, (g, qp) in enumerate(zip(keys_plan.groups, queries_plan)):
        if qp.max_q == 0:
            continue
        batch, max_k = g.batch, g.max_k
        # One sequence (every step at batch 1) takes slices and views where several take index ops: at a
        # cache use step's few queries each op's fixed cost is a good part of the layer's attention.
        queries = qg[:, qp.q0:qp.q1] if qp.q0 >= 0 else qg.index_select(1, qp.q_src)
        queries = _as(queries.reshape(num_kv_heads * batch, qp.max_q * group, head_dim), work)
        if g.cache_src is not None:  # the gathered cached rows, then the current keys copied over their rows
            keys, values = gathered[i][0], gathered[i][1]  # (kv_heads, batch * max_k, dim)
            if batch == 1:  # its current keys are k[k0:k1], its last rows
                keys[:, max_k - (g.k1 - g.k0):].copy_(k_hm[:, g.k0:g.k1])
                values[:, max_k - (g.k1 - g.k0):].copy_(v_hm[:, g.k0:g.k1])
            else:
                k_cur = k_hm if g.cur_src is None else k_hm.index_select(1, g.cur_src)
                v_cur = v_hm if g.cur_src is None else v_hm.index_select(1, g.cur_src)
                keys.index_copy_(1, g.cur_dst, _as(k_cur, keys.dtype))
                values.index_copy_(1, g.cur_dst, _as(v_cur, values.dtype))
        elif batch == 1:
            keys, values = k_hm[:, g.k0:g.k1], v_hm[:, g.k0:g.k1]
        else:
            keys, values = k_hm.index_select(1, g.k_src), v_hm.index_select(1, g.k_src)
        keys = _as(keys.reshape(num_kv_heads * batch, max_k, head_dim), work)
        values = _as(values.reshape(num_kv_heads * batch, max_k, head_dim), work)
        scores = torch.bmm(queries, keys.transpose(1, 2))  # (kv_heads * batch, max_q * group, max_k)
        scores = scores.mul_(scale)
        mask = None if g.key_mask is None else g.key_mask[None, :, :, None, :]  # (1, batch, 1, 1, max_k)
        if isinstance(causal_block, torch.Tensor) or causal_block:
            q_pos = positions.index_select(0, qp.q_src).view(batch, -1)
            k_pos = torch.where(g.is_cached, torch.arange(max_k, device=q.device)[None],
                                positions.index_select(0, g.k_src).view(batch, -1))
            cb = causal_block
            if isinstance(cb, torch.Tensor):  # each sequence its own block length: (batch, 1, 1)
                cb = cb.index_select(0, qp.q_src).view(batch, -1)[:, :1, None]
            seen = (k_pos[:, None, :] // cb) <= (q_pos[:, :, None] // cb)  # (batch, max_q, max_k)
            seen = seen[None, :, :, None, :]
            mask = seen if mask is None else mask & seen
        if mask is not None:
            scores.view(num_kv_heads, batch, qp.max_q, group, max_k).masked_fill_(~mask, float("-inf"))
        probs = _as(torch.softmax(scores, dim=-1, dtype=softmax_dtype), work)
        o = torch.bmm(probs, values).view(num_kv_heads, batch * qp.max_q, group, head_dim)
        if qp.q0 >= 0:
            out_g[qp.q0:qp.q1] = o.permute(1, 0, 2, 3)
        else:
            out_g.index_copy_(0, qp.out_rows, o.index_select(1, qp.out_src).permute(1, 0, 2, 3).to(q.dtype))
    return out


def static_attention(
    q: torch.Tensor,  # (num_seqs * width, num_heads, head_dim): sequence i in rows [i * width, (i + 1) * width)
    k: torch.Tensor,  # (num_seqs * width, num_kv_heads, head_dim): its current keys, the same rows
    v: torch.Tensor,  # (num_seqs * width, num_kv_heads, head_dim)
    k_cache: torch.Tensor,  # (num_pages, page_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,  # (num_pages, page_size, num_kv_heads, head_dim)
    block_table: torch.Tensor,  # (num_seqs, max_pages) int page ids; any valid page past a sequence's keys
    cache_seqlens: torch.Tensor,  # (num_seqs,) int cached keys per sequence
    scale: float | None = None,
) -> torch.Tensor:
    """``varlen_attention`` for equal-width sequences with the lengths and
    the block table as tensors, in fixed shapes with no host reads: every
    sequence gathers all ``max_pages * page_size`` slots its table row
    names and masks those past its cached length. The twin of
    ``kernels.attention.static_attention`` (what a captured step runs
    without Triton); it does the work of the longest possible sequence."""
    num_seqs, max_pages = block_table.shape
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    width, group = q.shape[0] // num_seqs, q.shape[1] // num_kv_heads
    page_size = k_cache.shape[1]
    num_slots = max_pages * page_size
    work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    slot = torch.arange(num_slots, device=q.device)
    # (num_seqs, num_slots) pool slot of each sequence's j-th key
    slots = block_table.long()[:, :, None].expand(-1, -1, page_size).reshape(num_seqs, num_slots) * page_size \
        + slot % page_size

    def per_seq(cache: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """Sequence b's keys (or values): its table's slots, then its current tokens."""
        cached = attention_plan.head_major_slots(cache).index_select(1, slots.view(-1))
        cached = cached.view(num_kv_heads, num_seqs, num_slots, head_dim)
        cur = cur.view(num_seqs, width, num_kv_heads, head_dim).permute(2, 0, 1, 3)
        return torch.cat((cached, cur), dim=2).reshape(num_kv_heads * num_seqs, num_slots + width, head_dim).to(work)

    keys, values = per_seq(k_cache, k), per_seq(v_cache, v)
    queries = q.view(num_seqs, width, num_kv_heads, group, head_dim).permute(2, 0, 1, 3, 4).to(work)
    queries = queries.reshape(num_kv_heads * num_seqs, width * group, head_dim)
    scores = torch.bmm(queries, keys.transpose(1, 2)) * (head_dim ** -0.5 if scale is None else scale)
    is_key = torch.cat((slot[None] < cache_seqlens.long()[:, None],  # (num_seqs, num_slots + width)
                        torch.ones(num_seqs, width, dtype=torch.bool, device=q.device)), 1)
    scores = scores.view(num_kv_heads, num_seqs, width * group, -1).masked_fill(~is_key[None, :, None], float("-inf"))
    probs = torch.softmax(scores.view(num_kv_heads * num_seqs, width * group, -1), dim=-1)
    out = torch.bmm(probs, values).view(num_kv_heads, num_seqs, width, group, head_dim)
    return out.permute(1, 2, 0, 3, 4).reshape(q.shape).to(q.dtype)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype; no dispatch when it already is (a few microseconds per call, many calls per step)."""
    return x if x.dtype == dtype else x.to(dtype)


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
    if quota.shape[0] == 1:  # one sequence: already grouped (fewer ops: host time at batch 1)
        seq_sorted = torch.zeros(num_rows, dtype=torch.int64, device=confidence.device)
        rank = torch.arange(num_rows, device=confidence.device)
    else:
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


def select_commits_host(
    confidence: np.ndarray,  # (num_rows,) float32
    row_seq: np.ndarray,  # (num_rows,) int64 row -> sequence index in [0, num_seqs)
    quota: np.ndarray,  # (num_seqs,) int64
    threshold: np.ndarray | None = None,  # (num_seqs,) float32; > 0 selects the threshold rule
) -> np.ndarray:
    """``select_commits`` on host arrays, (num_rows,) bool: the same rows,
    by the same comparisons of the same values (no arithmetic on them), so
    equal to the torch twin by construction; tested against it. It exists
    for host time per step: the twin is some twenty torch ops of a few
    microseconds each, a numpy array method costs well under one (the CPU
    engine's steps at small batches)."""
    num_rows = confidence.shape[0]
    commit = np.zeros(num_rows, dtype=bool)
    if quota.shape[0] == 1 and num_rows:  # one sequence (every step at batch 1): no grouping
        # Its most confident row is the first maximum: numpy's argmax ranks NaN highest, as torch's sort does.
        if threshold is not None and threshold[0] > 0:  # every row at or above tau, and at least the most confident
            commit[confidence >= threshold[0]] = True
            commit[confidence.argmax()] = True
        elif quota[0] == 1:  # one step's usual quota: no sort
            commit[confidence.argmax()] = True
        else:
            commit[_descending(confidence)[:max(int(quota[0]), 0)]] = True
        return commit
    order = _descending(confidence)
    seq_of = row_seq[order]
    if quota.shape[0] <= np.iinfo(np.int16).max:  # 16-bit keys: numpy's stable sort is a radix sort, 5x faster
        seq_of = seq_of.astype(np.int16)
    order = order[seq_of.argsort(kind="stable")]  # grouped by sequence, each most confident first
    seq_sorted = row_seq[order]
    counts = np.bincount(row_seq, minlength=quota.shape[0])
    rank = np.arange(num_rows) - (counts.cumsum() - counts)[seq_sorted]
    take = rank < quota[seq_sorted]
    if threshold is not None:
        by_threshold = threshold[seq_sorted] > 0
        take = np.where(by_threshold, (confidence[order] >= threshold[seq_sorted]) | (rank == 0), take)
    commit[order] = take
    return commit


def _descending(confidence: np.ndarray) -> np.ndarray:
    """Row indices, most confident first, ties in row order, NaN first: the
    order of torch's stable descending sort (numpy's sorts NaN last)."""
    order = (-confidence).argsort(kind="stable")
    if order.shape[0] and confidence[order[-1]] != confidence[order[-1]]:
        num_nan = int((confidence != confidence).sum())
        order = np.concatenate((order[-num_nan:], order[:-num_nan]))
    return order


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
