"""The KV page allocator, torch-free: which pages of the pool each request
owns. Pages are reserved at admission for the request's whole canvas and
returned when it finishes, so no request is ever preempted."""
from __future__ import annotations


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of one slot, got {num_pages} x {page_size}")
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> list[int]:
        n = self.pages_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"{n} pages asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
