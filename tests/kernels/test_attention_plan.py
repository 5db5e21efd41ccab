"""The step-level attention plan of the CPU twin and the head-major KV pool,
against computations by hand: every cached key a group gathers is the pool
slot its block table names, every query lands once in the output, a fill's
one-copy write stores each token's key and value in its slot, and the twin
fed the one gather of every layer equals per-sequence attention."""
from __future__ import annotations

import random

import torch

from kernels import attention_plan, reference
from server.models.kv_cache import CacheView, PagedKVCache
from tests.kernels.test_reference_attention import per_sequence


def random_step(seed: int, num_seqs: int, page_size: int = 4):
    """Current-token counts, cached counts and a shuffled block table."""
    rng = random.Random(seed)
    cur = [rng.choice([0, 1, 5, 8, 13]) for _ in range(num_seqs)]
    cached = [rng.choice([0, 3, 8, 21]) if cur[i] else rng.choice([0, 7]) for i in range(num_seqs)]
    max_pages = max(-(-n // page_size) for n in cached) + 1
    pages = list(range(num_seqs * max_pages + 3))
    rng.shuffle(pages)
    table = [pages[i * max_pages:(i + 1) * max_pages] for i in range(num_seqs)]
    cu = [0]
    for n in cur:
        cu.append(cu[-1] + n)
    return cu, cached, table, len(pages)


def test_gather_reads_each_cached_key_from_its_slot():
    for seed in range(20):
        num_seqs, page_size, layers, heads, dim = 1 + seed % 6, 4, 3, 2, 5
        cu, cached, table, num_pages = random_step(seed, num_seqs, page_size)
        pool = torch.randn(2, layers, heads, num_pages * page_size, dim, dtype=torch.float64)
        plan = attention_plan.plan_keys(cu, cached, torch.tensor(table, dtype=torch.int32), page_size, "cpu")
        gathered = attention_plan.gather_cached(plan, pool)
        seen = []
        for g, got in zip(plan.groups, gathered):
            seen += g.seqs
            assert (got is None) == (not any(cached[i] for i in g.seqs))
            for b, i in enumerate(g.seqs):
                n = cu[i + 1] - cu[i]
                assert g.max_k >= cached[i] + n
                for j in range(cached[i]):  # by hand: slot j of the sequence is page table[i][j // size]
                    slot = table[i][j // page_size] * page_size + j % page_size
                    assert torch.equal(got[:, :, :, b * g.max_k + j], pool[:, :, :, slot])
                if got is not None:
                    assert torch.isfinite(got).all()  # padding reads real slots
                    rows = g.cur_dst[sum(cu[s + 1] - cu[s] for s in g.seqs[:b]):][:n].tolist()
                    assert rows == list(range(b * g.max_k + cached[i], b * g.max_k + cached[i] + n))
        # Every sequence with keys in exactly one group, none without.
        assert sorted(seen) == [i for i in range(num_seqs) if cached[i] or cu[i + 1] > cu[i]]


def test_query_plan_places_every_query_once():
    for seed in range(20):
        num_seqs = 1 + seed % 6
        cu, cached, table, _ = random_step(seed, num_seqs)
        plan = attention_plan.plan_keys(cu, cached, torch.tensor(table, dtype=torch.int32), 4, "cpu")
        rng = random.Random(seed)
        rows = [rng.randint(0, cu[i + 1] - cu[i]) for i in range(num_seqs)]  # the last layer's queries
        cu_q = [0]
        for n in rows:
            cu_q.append(cu_q[-1] + n)
        placed = []
        for g, qp in zip(plan.groups, attention_plan.query_plan(plan, tuple(cu_q), "cpu")):
            assert qp.max_q == max(rows[i] for i in g.seqs)
            placed += qp.out_rows.tolist()
            assert torch.equal(qp.q_src[qp.out_src], qp.out_rows)  # each output row reads its own query
        owners = [i for i in range(num_seqs) if cached[i] or cu[i + 1] > cu[i]]
        assert sorted(placed) == [r for i in owners for r in range(cu_q[i], cu_q[i + 1])]


def test_fill_writes_each_token_into_its_slot_in_one_copy():
    layers, pages, page_size, heads, dim = 2, 6, 4, 3, 8
    cache = PagedKVCache.allocate(layers, pages, page_size, heads, dim, torch.float32, "cpu")
    slots = torch.tensor([9, -1, 0, 23, -1, 4, 5])
    view = CacheView(cache, torch.zeros(1, pages, dtype=torch.int32), [0], slots)
    k, v = torch.randn(7, heads, dim), torch.randn(7, heads, dim)
    view.write(1, k, v)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:  # the page views the Triton kernel reads
            assert torch.equal(cache.k[1][s // page_size, s % page_size], k[t])
            assert torch.equal(cache.v[1][s // page_size, s % page_size], v[t])
    assert cache.k[0].abs().sum() == 0 and cache.kv[:, 1].count_nonzero() == 2 * 5 * heads * dim


def test_twin_fed_one_gather_matches_per_sequence_attention():
    """A head-major pool, two layers, grouped-query heads: each layer's
    attention from the step's one gather equals SDPA sequence by sequence
    over keys picked by hand, and equals the twin gathering per layer."""
    layers, page_size, heads, kv_heads, dim = 2, 4, 4, 2, 8
    cu, cached, table, num_pages = random_step(3, 5, page_size)
    cache = PagedKVCache.allocate(layers, num_pages, page_size, kv_heads, dim, torch.float64, "cpu")
    cache.kv.copy_(torch.randn(cache.kv.shape, dtype=torch.float64))
    block_table = torch.tensor(table, dtype=torch.int32)
    view = CacheView(cache, block_table, cached, None)
    for layer in range(layers):
        q = torch.randn(cu[-1], heads, dim, dtype=torch.float64)
        k, v = torch.randn(cu[-1], kv_heads, dim, dtype=torch.float64), torch.randn(cu[-1], kv_heads, dim,
                                                                                     dtype=torch.float64)
        kwargs = dict(k_cache=cache.k[layer], v_cache=cache.v[layer], block_table=block_table, cache_seqlens=cached)
        got = reference.varlen_attention(q, k, v, cu, cu, cached_kv=lambda: view.gathered(layer, cu), **kwargs)
        torch.testing.assert_close(got, per_sequence(q, k, v, cu, cu, **kwargs), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got, reference.varlen_attention(q, k, v, cu, cu, **kwargs), atol=1e-12, rtol=0)


def test_use_steps_reuse_the_gather_until_the_pool_is_written():
    """Steps with the same key plan share one gather while nothing writes
    the pool (a dual_cache block's use steps); a fill's write, or any other
    in-place write to the pool, makes the next step gather afresh, and
    every step's attention equals per-sequence attention over the pool as
    it is then, with the step's own (new) current keys."""
    layers, page_size, heads, dim = 2, 4, 2, 8
    cu, cached, table, num_pages = random_step(5, 4, page_size)
    cache = PagedKVCache.allocate(layers, num_pages, page_size, heads, dim, torch.float64, "cpu")
    cache.kv.copy_(torch.randn(cache.kv.shape, dtype=torch.float64))
    block_table = torch.tensor(table, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    gathers = []
    for step in range(5):
        if step == 2:  # a fill stores one token of layer 1 (through the view, as the engine writes)
            fill = CacheView(cache, block_table, [0] * len(cached), torch.tensor([table[0][0] * page_size]))
            kv = torch.randn(2, 1, heads, dim, dtype=torch.float64, generator=gen)
            fill.write(1, kv[0], kv[1])
        if step == 4:  # a write that bypasses the view
            cache.kv[:, 0].mul_(0.5)
        view = CacheView(cache, block_table, cached, None)
        for layer in range(layers):
            q = torch.randn(cu[-1], heads, dim, dtype=torch.float64, generator=gen)
            k, v = (torch.randn(cu[-1], heads, dim, dtype=torch.float64, generator=gen) for _ in range(2))
            kwargs = dict(k_cache=cache.k[layer], v_cache=cache.v[layer], block_table=block_table,
                          cache_seqlens=cached)
            got = reference.varlen_attention(q, k, v, cu, cu, cached_kv=lambda: view.gathered(layer, cu),
                                             key_plan=lambda: view.key_plan(cu), **kwargs)
            torch.testing.assert_close(got, per_sequence(q, k, v, cu, cu, **kwargs), atol=1e-12, rtol=1e-12)
        gathers.append(view._gathered)
    same = [a is b for a, b in zip(gathers, gathers[1:])]
    assert same == [True, False, True, False]  # reused, written (fill), reused, written (in place)
