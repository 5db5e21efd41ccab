"""The paged KV cache a forward pass may read and write.

The pool holds, per layer, ``num_pages`` pages of ``page_size`` token slots.
A request owns a list of pages (its block table), reserved at admission for
its whole canvas. Attention is non-causal, so what a request caches is a set
of keys, not a sequence: the cache modes store whichever positions they keep
(the prefix, or prefix and suffix) packed from slot 0 of the request's pages.

Layout: one tensor for every layer's keys and values, head-major, ``(2,
num_layers, num_kv_heads, num_pages * page_size, head_dim)``. Per layer the
Triton kernel reads it through its strides as (num_pages, page_size,
num_kv_heads, head_dim) pages; on CPU a step's cached keys of every layer are
one gather (``kernels.attention_plan.gather_cached``) into the layout the
attention products take, and a fill's write is one copy per layer.

The pool keeps its last gather while nothing has written to it: the use
steps of a block read the same slots step after step (the same key plan) and
nothing writes them until the next fill, so they gather once per block, not
once per step. Any in-place write to the pool, through ``CacheView.write``
or not, bumps the tensor's version counter, which invalidates the gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import attention_plan


@dataclass
class PagedKVCache:
    kv: torch.Tensor  # (2, num_layers, num_kv_heads, num_pages * page_size, head_dim): keys, then values
    page_size: int

    def __post_init__(self) -> None:
        heads, slots, dim = self.kv.shape[2:]
        pages = self.kv.view(2, -1, heads, slots // self.page_size, self.page_size, dim).permute(0, 1, 3, 4, 2, 5)
        # layer -> (num_pages, page_size, num_kv_heads, head_dim) views of its keys / values, made once.
        self.k: list[torch.Tensor] = list(pages[0].unbind(0))
        self.v: list[torch.Tensor] = list(pages[1].unbind(0))
        # (key plan, the pool's version when gathered, the gather): the last gather, reused while both match.
        self._last_gather: tuple[attention_plan.KeyPlan, int, tuple[torch.Tensor | None, ...]] | None = None

    def gather(self, keys: attention_plan.KeyPlan) -> tuple[torch.Tensor | None, ...]:
        """Every layer's cached keys and values for ``keys``' groups
        (``attention_plan.gather_cached``); the previous result when it was
        made for the same plan and the pool has not been written since. The
        attention twin copies current keys over the non-cached rows of its
        result; a later step with the same plan overwrites the same rows, and
        never reads them first."""
        version = None if self.kv.is_inference() else self.kv._version  # inference tensors keep no counter
        last = self._last_gather
        if version is not None and last is not None and last[0] is keys and last[1] == version:
            return last[2]
        gathered = attention_plan.gather_cached(keys, self.kv)
        self._last_gather = None if version is None else (keys, version, gathered)
        return gathered

    @classmethod
    def allocate(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "PagedKVCache":
        kv = torch.zeros((2, num_layers, num_kv_heads, num_pages * page_size, head_dim), dtype=dtype, device=device)
        return cls(kv, page_size)


@dataclass
class CacheView:
    """How one forward pass uses the pool."""

    cache: PagedKVCache
    block_table: torch.Tensor  # (num_seqs, max_pages) int32: seq -> its pages
    cache_seqlens: list[int]  # seq -> cached keys its queries attend to besides its own tokens (0 = none)
    write_slots: torch.Tensor | None  # (num_tokens,) int64 flat slot page * page_size + offset; -1 = not stored

    def __post_init__(self) -> None:
        # The tokens that store (rows of k) and where: found once, used by every layer.
        self._rows = self._slots = None
        if self.write_slots is not None:
            self._rows = (self.write_slots >= 0).nonzero().squeeze(1)
            self._slots = self.write_slots.index_select(0, self._rows)
            if self._rows.numel() == self.write_slots.numel():
                self._rows = None  # every token stores: no selection
        self._keys: attention_plan.KeyPlan | None = None
        self._gathered: tuple[torch.Tensor | None, ...] | None = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores this layer's keys and values of the tokens that have a slot:
        one copy into the pool. k, v: (num_tokens, num_kv_heads, head_dim)."""
        if self._slots is None or self._slots.numel() == 0:
            return
        kv = torch.stack((k, v))  # (2, num_tokens, num_kv_heads, head_dim)
        if self._rows is not None:
            kv = kv.index_select(1, self._rows)
        self.cache.kv[:, layer].index_copy_(2, self._slots, kv.permute(0, 2, 1, 3))

    def key_plan(self, cu_seqlens: list[int]) -> attention_plan.KeyPlan:
        """The step's key plan for the CPU attention twin, built at the first
        call (every layer's attention has the same keys)."""
        if self._keys is None:
            self._keys = attention_plan.plan_keys(cu_seqlens, self.cache_seqlens, self.block_table,
                                                  self.cache.page_size, self.cache.kv.device)
        return self._keys

    def gathered(self, layer: int, cu_seqlens: list[int]) -> tuple[torch.Tensor | None, ...]:
        """This layer's cached keys and values as the CPU attention twin takes
        them (per group of the step's key plan, (2, num_kv_heads, batch *
        max_k, head_dim)), every layer gathered at the first call (or kept
        from an earlier step: ``PagedKVCache.gather``). The slots a step reads
        were written by earlier steps, never by this one, so one gather
        before the first layer serves them all."""
        if self._gathered is None:
            self._gathered = self.cache.gather(self.key_plan(cu_seqlens))
        return tuple(None if g is None else g[:, layer] for g in self._gathered)
