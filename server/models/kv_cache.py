"""The paged KV cache a forward pass may read and write.

The pool holds, per layer, ``num_pages`` pages of ``page_size`` token slots.
A request owns a list of pages (its block table), reserved at admission for
its whole canvas. Attention is non-causal, so what a request caches is a set
of keys, not a sequence: the cache modes store whichever positions they keep
(the prefix, or prefix and suffix) packed from slot 0 of the request's pages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKVCache:
    k: list[torch.Tensor]  # layer -> (num_pages, page_size, num_kv_heads, head_dim)
    v: list[torch.Tensor]  # layer -> (num_pages, page_size, num_kv_heads, head_dim)

    @classmethod
    def allocate(cls, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> "PagedKVCache":
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores this layer's keys and values of the tokens that have a slot."""
        if self._rows is None or self._rows.numel() == 0:
            return
        self.cache.k[layer].view(-1, *k.shape[1:]).index_copy_(0, self._slots, k.index_select(0, self._rows))
        self.cache.v[layer].view(-1, *v.shape[1:]).index_copy_(0, self._slots, v.index_select(0, self._rows))
