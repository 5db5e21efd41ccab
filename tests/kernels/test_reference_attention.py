"""The CPU attention twin (``reference.varlen_attention``), which batches
sequences of similar lengths into padded calls, against an independent
per-sequence computation in float64: every key gathered by hand (cached
pages in page order, then the current keys), SDPA with an explicit mask."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernels import reference


def per_sequence(q, k, v, cu_q, cu_k, k_cache=None, v_cache=None, block_table=None, cache_seqlens=None,
                 scale=None, causal_block=0, positions=None, compute_dtype=torch.float64):
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        n = cache_seqlens[i] if cache_seqlens else 0
        page_size = k_cache.shape[1] if n else 1
        cached = [(int(block_table[i, j // page_size]), j % page_size) for j in range(n)]
        keys = [k_cache[p, s] for p, s in cached] + [k[j] for j in range(k0, k1)]
        values = [v_cache[p, s] for p, s in cached] + [v[j] for j in range(k0, k1)]
        if q1 == q0:
            continue
        kh = torch.stack(keys).to(compute_dtype).repeat_interleave(group, 1).transpose(0, 1)  # (heads, keys, dim)
        vh = torch.stack(values).to(compute_dtype).repeat_interleave(group, 1).transpose(0, 1)
        mask = None
        if causal_block:
            k_pos = list(range(n)) + positions[k0:k1].tolist()
            mask = torch.tensor([[kp // causal_block <= int(qp) // causal_block for kp in k_pos]
                                 for qp in positions[q0:q1]])
        o = F.scaled_dot_product_attention(q[q0:q1].to(compute_dtype).transpose(0, 1), kh, vh, attn_mask=mask,
                                           scale=scale)
        out[q0:q1] = o.transpose(0, 1).double()
    return out


def ragged(q_lens, cache_lens=None, num_heads=4, num_kv_heads=2, head_dim=16, page_size=8, dtype=torch.float32,
           seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(cu[-1], num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(cu[-1], num_kv_heads, head_dim, generator=gen).to(dtype)
    kwargs = {}
    if cache_lens is not None:
        max_pages = max(-(-n // page_size) for n in cache_lens) or 1
        num_pages = len(q_lens) * max_pages + 3
        table = torch.randperm(num_pages, generator=gen)[: len(q_lens) * max_pages].view(len(q_lens), max_pages)
        kwargs = dict(k_cache=torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen).to(dtype),
                      v_cache=torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen).to(dtype),
                      block_table=table.int(), cache_seqlens=list(cache_lens))
    return (q, k, v, cu, cu), kwargs


CASES = {
    "one_sequence": dict(q_lens=[13]),
    "equal_lengths": dict(q_lens=[9] * 6),
    "ragged_with_empty": dict(q_lens=[1, 50, 0, 7, 19, 48]),
    "paged_blocks": dict(q_lens=[8, 8, 8, 8], cache_lens=[24, 40, 0, 17]),
    "paged_ragged": dict(q_lens=[3, 30, 1, 8], cache_lens=[100, 2, 9, 0], page_size=16),
    "mha_head_dim_48": dict(q_lens=[20, 22, 18], num_heads=4, num_kv_heads=4, head_dim=48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_per_sequence_attention(case):
    args, kwargs = ragged(**CASES[case])
    out = reference.varlen_attention(*args, **kwargs)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    torch.testing.assert_close(out.double(), per_sequence(*args, **kwargs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_lens", [None, [16, 0, 8]], ids=["no_cache", "cached_prefix"])
def test_block_causal(cache_lens):
    q_lens = [12, 5, 20]
    args, kwargs = ragged(q_lens, cache_lens)
    starts = cache_lens or [0] * len(q_lens)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, q_lens)])
    kwargs.update(causal_block=4, positions=positions)
    torch.testing.assert_close(reference.varlen_attention(*args, **kwargs).double(),
                               per_sequence(*args, **kwargs), atol=1e-5, rtol=1e-5)


def test_scale_and_half_precision():
    args, kwargs = ragged([6, 11, 40], [9, 0, 30], dtype=torch.bfloat16, head_dim=64)
    out = reference.varlen_attention(*args, **kwargs, scale=0.3)
    assert out.dtype == torch.bfloat16
    exact = per_sequence(*args, **kwargs, scale=0.3)
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)
    # No less accurate than SDPA run on the bfloat16 inputs sequence by sequence.
    sdpa = per_sequence(*args, **kwargs, scale=0.3, compute_dtype=torch.bfloat16)
    assert (out.double() - exact).abs().max() <= 1.25 * (sdpa - exact).abs().max() + 1e-3


def test_float64_stays_float64():
    args, kwargs = ragged([7, 3], [5, 12], dtype=torch.float64)
    out = reference.varlen_attention(*args, **kwargs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, per_sequence(*args, **kwargs), atol=1e-12, rtol=1e-12)


def test_groups_cover_every_sequence_once_and_bound_padding():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        q_lens = [rng.choice([0, 1, 8, 32, rng.randint(1, 600)]) for _ in range(n)]
        k_lens = [q + rng.choice([0, 0, rng.randint(0, 4000)]) for q in q_lens]
        k_lens = [max(k, 1) for k in k_lens]
        groups = reference.attention_groups(q_lens, k_lens)
        flat = sorted(i for g in groups for i in g)
        assert flat == [i for i in range(n) if q_lens[i]]  # each sequence with queries, once
        for g in groups:
            real = sum(q_lens[i] * k_lens[i] for i in g)
            padded = len(g) * max(q_lens[i] for i in g) * max(k_lens[i] for i in g)
            assert padded <= 2.0 * real or len(g) == 1
            assert all(max(q_lens[j] for j in g) * max(k_lens[j] for j in g) <= 4.0 * q_lens[i] * k_lens[i]
                       for i in g)


def test_similar_sequences_share_one_call_and_outliers_do_not():
    # 16 canvases of 40-60 tokens: one call; a 4000-token one beside them: its own.
    lens = [40 + 20 * i // 15 for i in range(16)]
    assert len(reference.attention_groups(lens, lens)) == 1
    groups = reference.attention_groups(lens + [4000], lens + [4000])
    assert [16] in groups and len(groups) == 2


def test_fewer_queries_than_keys_with_a_cache():
    # The last layer's shape: a few query rows per sequence over all its current and cached keys.
    (q, k, v, cu, _), kwargs = ragged([12, 8, 30, 8], [40, 0, 9, 25])
    q_lens = [3, 0, 5, 8]
    cu_q = [0]
    for n in q_lens:
        cu_q.append(cu_q[-1] + n)
    q = q[: cu_q[-1]]
    out = reference.varlen_attention(q, k, v, cu_q, cu, **kwargs)
    torch.testing.assert_close(out.double(), per_sequence(q, k, v, cu_q, cu, **kwargs), atol=1e-5, rtol=1e-5)
