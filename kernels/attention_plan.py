"""How the CPU attention twin lays out one step's ragged batch: built once
per step from the lengths and the block table, shared by every layer.

Sequences of similar lengths share one padded computation (``groups``).
Each group's keys are laid out head-major, ``(num_kv_heads, batch * max_k,
head_dim)``: sequence b's keys in rows [b * max_k, (b + 1) * max_k), its
cached keys first, then its current ones, then padding. That is the layout
the paged KV pool keeps (``server.models.kv_cache``: per layer and head, the
slots in a row), so a group's cached keys are one gather along the slot
dimension, and the gather of every layer's keys and values is one call per
step (``gather_cached``). Current keys are copied over their rows per layer.

The key side (``KeyPlan``) depends on the key lengths and the block table
only; the query side (``QueryPlan``) on the query lengths as well, so the
last layer, whose queries are only the rows that need logits, reuses the
key side (and the gathered keys) of the other layers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class KeyGroup:
    """The keys of one group of sequences. Padding rows read a real key (a
    cached slot, or a current key) so every padded value is finite before
    the mask removes it."""

    seqs: tuple[int, ...]  # the group's sequences, in row order
    max_k: int  # keys per sequence row, padded
    k_src: torch.Tensor  # (batch * max_k,) int64 row of k for each key row (cached rows: any real row)
    cache_src: torch.Tensor | None  # (batch * max_k,) int64 pool slot for each key row; None: nothing cached
    cur_src: torch.Tensor | None  # (num_cur,) rows of k of the group's current keys; None: all of k, in order
    cur_dst: torch.Tensor | None  # (num_cur,) their key rows (cache groups only)
    is_cached: torch.Tensor  # (batch, max_k) bool: the row holds a cached key
    key_mask: torch.Tensor | None  # (batch, 1, max_k) bool: keys that exist; None: all do
    k0: int = 0  # one sequence: its current keys are k[k0:k1] (its key rows' last k1 - k0, after any cached)
    k1: int = 0

    @property
    def batch(self) -> int:
        return len(self.seqs)


@dataclass(frozen=True, eq=False)
class KeyPlan:
    groups: tuple[KeyGroup, ...]
    num_slots_read: int  # cached keys read per layer, padding included


@dataclass(frozen=True, eq=False)
class QueryGroup:
    """The queries of one key group."""

    max_q: int  # queries per sequence row, padded (0: the group has none)
    q_src: torch.Tensor  # (batch * max_q,) int64 row of q for each query row
    out_rows: torch.Tensor  # (num_queries,) rows of the output ...
    out_src: torch.Tensor  # ... and the query rows they come from
    q0: int = -1  # one sequence: its queries are q[q0:q1] (-1: use the indices)
    q1: int = -1


def _tensor(values: list, device: str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=8)
def key_plan(cu_k: tuple[int, ...], cached: tuple[int, ...], table: tuple[tuple[int, ...], ...] | None,
             page_size: int, device: str) -> KeyPlan:
    """The key side of a step: ``cu_k`` current-key starts, ``cached`` keys
    read from the pool per sequence (its slots 0..n-1 through ``table``, the
    block table as tuples). Shared by every caller with these arguments: not
    to be changed."""
    num_seqs = len(cu_k) - 1
    cur = [cu_k[i + 1] - cu_k[i] for i in range(num_seqs)]
    k_lens = [cached[i] + cur[i] for i in range(num_seqs)]
    # Group by keys and current tokens (the queries of every layer but the last).
    group_lens = [cur[i] or (1 if cached[i] else 0) for i in range(num_seqs)]
    groups, read = [], 0
    for seqs in attention_groups(group_lens, k_lens):
        batch, max_k = len(seqs), max(k_lens[i] for i in seqs)
        any_cached = any(cached[i] for i in seqs)
        filler = next((table[i][0] * page_size for i in seqs if cached[i]), 0)
        any_row = next((cu_k[i] for i in seqs if cur[i]), 0)
        k_src, cache_src, cur_src, cur_dst, is_cached, valid = [], [], [], [], [], []
        for b, i in enumerate(seqs):
            n = cached[i]
            k_src += [any_row] * n + list(range(cu_k[i], cu_k[i + 1])) + [any_row] * (max_k - k_lens[i])
            cache_src += [table[i][j // page_size] * page_size + j % page_size for j in range(n)]
            cache_src += [filler] * (max_k - n)
            cur_src += range(cu_k[i], cu_k[i + 1])
            cur_dst += range(b * max_k + n, b * max_k + k_lens[i])
            is_cached += [True] * n + [False] * (max_k - n)
            valid += [True] * k_lens[i] + [False] * (max_k - k_lens[i])
        all_cur = cur_src == list(range(cu_k[-1]))
        span = (cu_k[seqs[0]], cu_k[seqs[0] + 1]) if batch == 1 else (0, 0)
        read += batch * max_k if any_cached else 0
        groups.append(KeyGroup(
            tuple(seqs), max_k, _tensor(k_src, device), _tensor(cache_src, device) if any_cached else None,
            None if all_cur or not any_cached else _tensor(cur_src, device),
            _tensor(cur_dst, device) if any_cached else None,
            _tensor(is_cached, device, torch.bool).view(batch, max_k),
            None if all(valid) else _tensor(valid, device, torch.bool).view(batch, 1, max_k), *span))
    return KeyPlan(tuple(groups), read)


@functools.lru_cache(maxsize=8)
def query_plan(keys: KeyPlan, cu_q: tuple[int, ...], device: str) -> tuple[QueryGroup, ...]:
    """The query side for ``keys``' groups: ``cu_q`` query starts (the
    current tokens, or the rows that need logits)."""
    out = []
    for g in keys.groups:
        q_lens = [cu_q[i + 1] - cu_q[i] for i in g.seqs]
        max_q = max(q_lens)
        any_row = next((cu_q[i] for i in g.seqs if cu_q[i + 1] > cu_q[i]), 0)
        q_src, out_rows, out_src = [], [], []
        for b, i in enumerate(g.seqs):
            q_src += list(range(cu_q[i], cu_q[i + 1])) + [any_row] * (max_q - q_lens[b])
            out_rows += range(cu_q[i], cu_q[i + 1])
            out_src += range(b * max_q, b * max_q + q_lens[b])
        span = (cu_q[g.seqs[0]], cu_q[g.seqs[0] + 1]) if g.batch == 1 else (-1, -1)
        out.append(QueryGroup(max_q, _tensor(q_src, device), _tensor(out_rows, device), _tensor(out_src, device),
                              *span))
    return tuple(out)


def plan_keys(cu_k: list[int], cache_seqlens: list[int] | None, block_table: torch.Tensor | None,
              page_size: int, device: torch.device | str) -> KeyPlan:
    """``key_plan`` from the attention call's arguments (a block table
    tensor, lists); no cache when ``cache_seqlens`` is None or all zero."""
    num_seqs = len(cu_k) - 1
    use_cache = cache_seqlens is not None and any(cache_seqlens)
    cached = tuple(map(int, cache_seqlens)) if use_cache else (0,) * num_seqs
    table = tuple(map(tuple, block_table.tolist())) if use_cache else None
    return key_plan(tuple(map(int, cu_k)), cached, table, page_size if use_cache else 0, str(device))


def gather_cached(keys: KeyPlan, pool: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Every layer's cached keys and values of every group, one gather per
    group: ``pool`` is (2, num_layers, num_kv_heads, num_slots, head_dim)
    (keys, then values); returns per group (2, num_layers, num_kv_heads,
    batch * max_k, head_dim), or None for a group without cached keys."""
    flat = pool.flatten(0, 2)  # (2 * num_layers * num_kv_heads, num_slots, head_dim)
    return tuple(None if g.cache_src is None else
                 flat.index_select(1, g.cache_src).view(*pool.shape[:3], -1, pool.shape[-1]) for g in keys.groups)


def head_major_slots(cache: torch.Tensor) -> torch.Tensor:
    """A (num_pages, page_size, num_kv_heads, head_dim) cache as (num_kv_heads,
    num_pages * page_size, head_dim): a view of a head-major pool, else a copy."""
    hm = cache.permute(2, 0, 1, 3)
    return hm.view(hm.shape[0], -1, hm.shape[-1]) if hm.is_contiguous() else hm.reshape(hm.shape[0], -1, hm.shape[-1])


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
