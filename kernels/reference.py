"""Torch twins of every kernel: the oracle the Triton kernels are tested
against, and the path used on CPU.

The twins define the numerics. In particular the Gumbel noise of sampling is
a pure function of (seed, offset) computed with the same Philox-4x32-10
generator as Triton's ``tl.rand``, so the CPU path, the GPU kernel and the
reference sampler draw bit-identical noise, whatever rows a step computes and
whatever requests share the batch.
"""
from __future__ import annotations

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
    causal_block: int = 0,  # > 0: block-causal attention over blocks of this many positions
    positions: torch.Tensor | None = None,  # (num_q_tokens,) canvas positions (block-causal only)
) -> torch.Tensor:
    """Non-causal attention over a ragged batch: the queries of sequence i
    attend to its cached keys (if any) and to its current keys, all of them
    (no causal mask: LLaDA is bidirectional). Returns (num_q_tokens,
    num_heads, head_dim) in q's dtype.

    With ``causal_block`` (block-causal models such as LLaDA2), a query at
    position p sees a key at position j only if j // causal_block <=
    p // causal_block; queries and current keys are the same tokens, and
    cached keys are the sequence's positions [0, cache_seqlens[i]).

    Sequences of similar lengths share one padded SDPA call (each sequence's
    keys in its own row, cached ones first, padding masked out), so a step
    costs a few calls per layer, not one per sequence; ``attention_groups``
    bounds the padding."""
    num_seqs = len(cu_seqlens_q) - 1
    use_cache = k_cache is not None and cache_seqlens is not None
    cached = list(cache_seqlens) if use_cache else [0] * num_seqs
    q_lens = [cu_seqlens_q[i + 1] - cu_seqlens_q[i] for i in range(num_seqs)]
    k_lens = [cached[i] + cu_seqlens_k[i + 1] - cu_seqlens_k[i] for i in range(num_seqs)]
    out = torch.empty_like(q)
    for group in attention_groups(q_lens, k_lens):
        _attend_padded(out, q, k, v, group, cu_seqlens_q, cu_seqlens_k, cached,
                       k_cache if use_cache else None, v_cache, block_table, scale, causal_block, positions)
    return out


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


def _attend_padded(out, q, k, v, group, cu_q, cu_k, cached, k_cache, v_cache, block_table, scale,
                   causal_block, positions) -> None:
    """Attention for the sequences in ``group`` as one (len(group), heads,
    max_q, max_k) batched computation; writes their rows of ``out``."""
    if len(group) == 1:  # plain slices, no padding
        i = group[0]
        q0, q1, k0, k1, n = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1], cached[i]
        keys, values = k[k0:k1], v[k0:k1]
        if n:
            page_size = k_cache.shape[1]
            pages = block_table[i, : (n + page_size - 1) // page_size].long()
            keys = torch.cat([k_cache[pages].flatten(0, 1)[:n], keys])
            values = torch.cat([v_cache[pages].flatten(0, 1)[:n], values])
        mask = None
        if causal_block:
            k_pos = torch.cat([torch.arange(n, device=q.device), positions[k0:k1]])
            mask = ((k_pos[None, :] // causal_block) <= (positions[q0:q1, None] // causal_block))[None]
        o = _softmax_attention(q[q0:q1][None], keys[None], values[None], mask, scale)
        out[q0:q1] = o[0]
        return

    dev = q.device
    q_start = torch.tensor([cu_q[i] for i in group], device=dev)
    q_len = torch.tensor([cu_q[i + 1] - cu_q[i] for i in group], device=dev)
    k_start = torch.tensor([cu_k[i] for i in group], device=dev)
    n_cached = torch.tensor([cached[i] for i in group], device=dev)
    k_len = n_cached + torch.tensor([cu_k[i + 1] - cu_k[i] for i in group], device=dev)
    max_q = max(cu_q[i + 1] - cu_q[i] for i in group)
    max_k = max(cached[i] + cu_k[i + 1] - cu_k[i] for i in group)

    # Queries: (group, max_q) rows of q; padding rows read row 0 and are dropped.
    jq = torch.arange(max_q, device=dev)[None, :]
    q_valid = jq < q_len[:, None]
    q_rows = torch.where(q_valid, q_start[:, None] + jq, 0)
    # Keys: slot j of sequence b holds its cached key j (j < n_cached[b]),
    # then its current keys, then padding (masked).
    jk = torch.arange(max_k, device=dev)[None, :]
    k_valid = jk < k_len[:, None]
    is_cached = jk < n_cached[:, None]
    k_rows = torch.where(k_valid & ~is_cached, k_start[:, None] + jk - n_cached[:, None], 0)
    keys, values = k[k_rows], v[k_rows]  # (group, max_k, kv_heads, head_dim)
    if any(cached[i] for i in group):
        page_size = k_cache.shape[1]
        table = block_table[group].long()  # (group, max_pages)
        page = torch.clamp(jk // page_size, max=table.shape[1] - 1).expand(len(group), -1)
        slots = torch.where(is_cached, table.gather(1, page) * page_size + jk % page_size, 0)
        keys = torch.where(is_cached[..., None, None], k_cache.flatten(0, 1)[slots], keys)
        values = torch.where(is_cached[..., None, None], v_cache.flatten(0, 1)[slots], values)

    mask = None
    if causal_block:
        k_pos = torch.where(is_cached, jk, positions[k_rows])  # (group, max_k)
        mask = (k_pos[:, None, :] // causal_block) <= (positions[q_rows][:, :, None] // causal_block)
        mask = mask & k_valid[:, None, :]  # (group, max_q, max_k)
    elif not bool(k_valid.all()):
        mask = k_valid[:, None, :]  # (group, 1, max_k)
    o = _softmax_attention(q[q_rows], keys, values, mask, scale)
    out[q_rows[q_valid]] = o[q_valid]


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None) -> torch.Tensor:
    """q: (batch, num_q, heads, dim); k, v: (batch, num_k, kv_heads, dim);
    mask: None or bool broadcastable to (batch, num_q, num_k), true = attend.
    Returns (batch, num_q, heads, dim).

    Scores, softmax and the weighted sum as two batched GEMMs: at the sizes a
    denoising step has on CPU (tens of queries and keys per sequence) this is
    about twice as fast as SDPA's flash kernel and equal to it up to float
    rounding. The softmax runs in float32 (float64 for float64 inputs)."""
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if num_kv_heads != num_heads:
        kh, vh = kh.repeat_interleave(num_heads // num_kv_heads, 1), vh.repeat_interleave(num_heads // num_kv_heads, 1)
    scores = torch.matmul(qh, kh.transpose(-1, -2))  # (batch, heads, num_q, num_k)
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1).to(vh.dtype), vh)
    return o.transpose(1, 2)


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
