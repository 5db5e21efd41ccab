"""Captured static use steps: one CUDA graph per batch-size bucket.

A static step (server/engine/buckets.py: every sequence a cache use step of
one width, padded to its bucket) is run by ``RaggedLM.forward_static``, whose
every input lives in a tensor allocated here once, at the largest bucket, and
never reallocated: token ids, positions, cached lengths, and the block table
padded to ``max_pages`` per sequence. ``StepGraphs.capture`` records, per
bucket, the forward over that bucket's slices of these buffers; ``run``
writes a step's real inputs into them (one host-to-device copy) and replays,
returning the logits of every token of the bucket in the graph's own output
tensor, valid until the next replay. The sampler runs outside the graph.

A ``Graph`` is anything that can capture a step and replay it. ``CudaGraph``
is ``torch.cuda.CUDAGraph`` (warm-up runs on a side stream first, then the
capture into a pool every bucket shares, largest bucket first, as vLLM
does). ``StandInGraph`` is the CPU test double: capture calls the step once,
replay calls the same closure again on the same buffer objects, so a value
frozen at capture instead of read from a buffer shows up as wrong tokens on
CPU too.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

import numpy as np
import torch

from server.models.kv_cache import PagedKVCache

logger = logging.getLogger(__name__)

Step = Callable[[], torch.Tensor]  # the forward over static buffers -> logits


class Graph(Protocol):
    def capture(self, step: Step) -> torch.Tensor: ...

    def replay(self) -> torch.Tensor: ...


class StandInGraph:
    """Capture runs ``step`` once; replay runs the same closure again."""

    def capture(self, step: Step) -> torch.Tensor:
        self._step = step
        return step()

    def replay(self) -> torch.Tensor:
        return self._step()


class CudaGraph:
    """``torch.cuda.CUDAGraph`` capturing into ``pool`` (shared by every bucket)."""

    WARMUP_RUNS = 2  # compiles the Triton kernels and settles the allocator before capture

    def __init__(self, pool) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()
        self.out: torch.Tensor | None = None

    def capture(self, step: Step) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.out = step()
        return self.out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


def cuda_graphs() -> Callable[[], Graph]:
    """New ``CudaGraph``s sharing one memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)


class StepGraphs:
    """The captured static steps of one model and KV pool, for the given
    widths (tokens per sequence) and every bucket."""

    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, buckets: list[int], widths: list[int],
                 max_pages: int, new_graph: Callable[[], Graph]):
        self.model, self.kv_cache = model, kv_cache
        self.buckets, self.widths, self.max_pages = sorted(buckets), sorted(set(widths)), max_pages
        self.new_graph = new_graph
        dev = model.device
        max_seqs, max_tokens = self.buckets[-1], self.buckets[-1] * self.widths[-1]
        # One host buffer, one copy per step: ids, positions, cached lengths, block table (row-major).
        self._ids, self._pos = slice(0, max_tokens), slice(max_tokens, 2 * max_tokens)
        self._lens = slice(2 * max_tokens, 2 * max_tokens + max_seqs)
        self._table = slice(self._lens.stop, self._lens.stop + max_seqs * max_pages)
        size = self._table.stop
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.staged = self.host.numpy()
        self.inputs = self.host if dev.type == "cpu" else torch.zeros(size, dtype=torch.int64, device=dev)
        # Rotary tables for every position a fitting step can hold, made once: the graphs keep reading these.
        self.tables = model.rotary.tables(max(max_pages * kv_cache.page_size, self.widths[-1]), dev)
        self.graphs: dict[tuple[int, int], Graph] = {}  # (bucket, width) -> its captured step

    def _step(self, bucket: int, width: int) -> Step:
        """The forward over this bucket's slices of the static buffers."""
        n, inputs = bucket * width, self.inputs
        ids, positions = inputs[self._ids][:n], inputs[self._pos][:n]
        lens = inputs[self._lens][:bucket]
        table = inputs[self._table].view(-1, self.max_pages)[:bucket]

        def step() -> torch.Tensor:
            # int32 copies made on the device, inside the graph: the kernel's index types.
            return self.model.forward_static(ids, positions, self.kv_cache, table.to(torch.int32),
                                             lens.to(torch.int32), self.tables)

        return step

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every (bucket, width), largest first so that smaller
        graphs reuse the pool's memory. Inputs read during capture: any
        valid page (0) and no cached keys."""
        self.staged[:] = 0
        self._upload()
        for width in reversed(self.widths):
            for bucket in reversed(self.buckets):
                graph = self.new_graph()
                graph.capture(self._step(bucket, width))
                self.graphs[bucket, width] = graph

    def fits(self, bucket: int, width: int, num_pages: int) -> bool:
        """Whether a step has a graph: its bucket and width were captured and
        its longest sequence's ``num_pages`` fit the static block table."""
        return (bucket, width) in self.graphs and num_pages <= self.max_pages

    def run(self, bucket: int, width: int, ids: list[int], positions: np.ndarray, cache_seqlens: list[int],
            pages: list[list[int]]) -> torch.Tensor:
        """Replays the (bucket, width) graph on a step's inputs: ``ids`` and
        ``positions`` of bucket * width tokens (padding sequences included),
        ``cache_seqlens`` and ``pages`` of the real sequences (padding ones
        cache nothing). Returns (bucket * width, vocab) logits, overwritten
        by the next replay."""
        n, staged = bucket * width, self.staged
        staged[self._ids.start:self._ids.start + n] = ids
        staged[self._pos.start:self._pos.start + n] = positions
        lens = staged[self._lens]
        lens[:bucket] = 0
        lens[:len(cache_seqlens)] = cache_seqlens
        # Entries past a sequence's pages keep earlier steps' values: valid page ids, masked by the lengths.
        table = staged[self._table].reshape(-1, self.max_pages)
        for i, p in enumerate(pages):
            table[i, :len(p)] = p
        self._upload()
        return self.graphs[bucket, width].replay()

    def _upload(self) -> None:
        # Non-blocking from pinned memory: the replay is queued behind it on
        # the same stream, and the host writes the buffer again only after
        # the step's results were read back (a sync).
        if self.inputs is not self.host:
            self.inputs.copy_(self.host, non_blocking=True)


def why_no_graphs(model, device: torch.device, tensor_parallel: bool, has_kv_cache: bool) -> str | None:
    """Why static use steps cannot be captured as CUDA graphs here (None:
    they can). Asked once before the KV pool is sized, which reserves the
    graphs' memory, and again at capture."""
    if device.type != "cuda":
        return f"CUDA graphs need CUDA (device {device})"
    if tensor_parallel:
        return "CUDA graphs are not captured with tensor parallelism"
    if not has_kv_cache:
        return "no KV cache, so no cache use steps to capture"
    if not model.has_static_step:
        return f"{type(model).__name__} has no static step (block-causal, expert routing or shifted logits)"
    return None


def capture_at_start(runner, device: torch.device, widths: list[int], max_model_len: int,
                     tensor_parallel: bool) -> bool:
    """The engine's start-up (when not --enforce-eager): captures the
    static steps of each of ``widths`` tokens per sequence (the default
    block lengths: the checkpoint's and the server's) at every bucket, with
    a block table of ``max_model_len`` keys, where graphs can run; otherwise
    logs why static steps run padded but eagerly. Returns whether graphs
    were captured."""
    why = why_no_graphs(runner.model, device, tensor_parallel, runner.kv_cache is not None)
    if why:
        logger.info("%s: static cache use steps run padded to their batch buckets, eagerly", why)
        return False
    max_pages = -(-max_model_len // runner.kv_cache.page_size)
    free_before = torch.cuda.mem_get_info(device)[0]
    t0 = time.perf_counter()
    graphs = runner.capture_graphs(widths, max_pages, cuda_graphs())
    logger.info("CUDA graphs: captured %d static steps (buckets %s, %s tokens per sequence, tables of %d pages) "
                "in %.1f s, using %.2f GiB", len(graphs.graphs), runner.bucket_sizes,
                " and ".join(map(str, widths)), max_pages, time.perf_counter() - t0,
                (free_before - torch.cuda.mem_get_info(device)[0]) / 2 ** 30)
    return True
