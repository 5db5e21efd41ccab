"""Sizing the KV-cache pool from device memory, as vLLM and nano-vllm do.

On CUDA, unless ``--kv-cache-tokens`` fixes the pool, the engine runs one
profile forward at the largest batch the scheduler may form
(``max_num_batched_tokens`` tokens in ``max_num_seqs`` sequences, logits on
every token, the sampler's float32 softmax over them) and gives the KV pool
what is left of ``gpu_memory_utilization`` of the device's total memory:

    pool bytes = utilization * total - peak after the profile

where the peak counts everything this process holds on the device: weights,
the profile's activations, and memory outside torch's allocator (the CUDA
context, library workspaces). When static use steps will be captured as CUDA
graphs (``--no-enforce-eager``), the graphs' memory pool comes off the pool
too: the captured steps share one pool sized by the largest bucket's step,
and the allocator never hands it back to eager steps, so a second profile
forward at that step's shape (every token's logits, as the graph keeps
them) measures what to reserve, with the logits each other graph keeps as
its output:

    pool bytes = utilization * total - peak after the profile - largest graph step's activations
                 - the other graph steps' logits

On CPU ``--kv-cache-tokens`` keeps its meaning.

The arithmetic is a pure function (``kv_pages_from_memory``); the memory
figures come from a ``MemorySource``, so the profile and the sizing run on
CPU in tests with injected figures.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import torch

from server.engine.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)

GiB = 1 << 30


class MemorySource(Protocol):
    """Where the device's memory figures come from (CUDA, or a test's)."""

    def total(self) -> int:
        """The device's total memory in bytes."""

    def reset_peak(self) -> None:
        """Starts a new peak measurement (before the profile forward)."""

    def peak(self) -> int:
        """The most device memory this process has held since ``reset_peak``."""


class CudaMemory:
    """torch's allocator statistics plus what CUDA holds outside them."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # Held by this process but not by torch's allocator: the context, cuBLAS workspaces.
        outside = max(0, (total - free) - torch.cuda.memory_reserved(self.device))
        return torch.cuda.max_memory_reserved(self.device) + outside


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one cached token takes over all layers."""
    cfg = model.config
    elem = torch.empty((), dtype=model.dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * elem


def kv_pages_from_memory(total: int, peak: int, utilization: float, page_bytes: int, graph_bytes: int = 0) -> int:
    """KV pages that fit in ``utilization * total`` bytes once ``peak`` bytes
    (weights and the largest step's activations) are held and ``graph_bytes``
    are reserved for CUDA graphs. Raises ValueError naming the flag to change
    when none fit."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(utilization * total) - peak - graph_bytes
    if budget < page_bytes:
        graphs = f" and CUDA graphs {graph_bytes / GiB:.1f} GiB more" if graph_bytes else ""
        raise ValueError(
            f"gpu_memory_utilization: {utilization} of the device's {total / GiB:.1f} GiB is "
            f"{utilization * total / GiB:.1f} GiB, and the weights plus the largest step's activations "
            f"already take {peak / GiB:.1f} GiB{graphs}: no room for the KV cache. Raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens"
            f"{' or --max-num-seqs, run --enforce-eager' if graph_bytes else ''}, "
            "or turn the cache off with --kv-cache-tokens 0")
    return budget // page_bytes


@torch.inference_mode()
def profile_forward(model: torch.nn.Module, num_tokens: int, num_seqs: int, with_softmax: bool = True) -> int:
    """One forward at the largest batch the scheduler may form: ``num_tokens``
    tokens in ``num_seqs`` sequences (as equal as they split), logits on every
    token and (``with_softmax``) their float32 softmax (the sampler's
    probabilities): at least the activation memory any real step needs.
    Returns the bytes of one token's logits."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    cu_seqlens = [0]
    for n in lengths:
        cu_seqlens.append(cu_seqlens[-1] + n)
    dev = model.device
    ids = torch.full((num_tokens,), model.config.mask_token_id, dtype=torch.long, device=dev)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
    logits = model(ids, positions, cu_seqlens)  # (num_tokens, vocab)
    if with_softmax:
        torch.softmax(logits.float(), dim=-1)
    return logits.shape[1] * logits.element_size()


def size_kv_cache(model: torch.nn.Module, config: SchedulerConfig, utilization: float,
                  memory: MemorySource | None, request_tokens: int,
                  graph_steps: list[tuple[int, int]] | None = None) -> SchedulerConfig:
    """``config`` with ``kv_cache_tokens`` set from device memory, when there
    is a memory source and the user fixed no size; else ``config`` as is.
    ``graph_steps``: (sequences, tokens per sequence) of every step that
    will be captured as a CUDA graph, whose memory is reserved: the largest
    step's activations (the pool every graph shares) and the logits each
    other graph keeps as its output. Logs the pool in tokens and how many
    ``request_tokens``-long requests (prompt + canvas) it holds at once."""
    if memory is None or config.kv_cache_tokens is not None:
        return config
    memory.reset_peak()
    profile_forward(model, config.max_num_batched_tokens, config.max_num_seqs)
    total, peak = memory.total(), memory.peak()
    graph_bytes = 0
    if graph_steps:
        num_seqs, width = max(graph_steps, key=lambda step: step[0] * step[1])
        memory.reset_peak()
        held = memory.peak()  # the weights (and what lives outside the allocator), no activations
        row_bytes = profile_forward(model, num_seqs * width, num_seqs, with_softmax=False)  # sampler: outside graphs
        kept = sum(n * w for n, w in graph_steps) - num_seqs * width  # the other graphs' logits, kept as outputs
        graph_bytes = max(0, memory.peak() - held) + kept * row_bytes
        logger.info("CUDA graphs: %.2f GiB reserved for their memory pool (the largest captured step, %d sequences "
                    "x %d tokens, and the logits of %d other steps)", graph_bytes / GiB, num_seqs, width,
                    len(graph_steps) - 1)
    page_bytes = kv_bytes_per_token(model) * config.page_size
    pages = kv_pages_from_memory(total, peak, utilization, page_bytes, graph_bytes)
    if pages <= config.max_num_seqs:
        raise ValueError(
            f"gpu_memory_utilization: the KV cache left over fits {pages} pages of {config.page_size} tokens, "
            f"fewer than one page more than max_num_seqs ({config.max_num_seqs}). Raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens / --max-num-seqs")
    # num_kv_pages adds one rounding page per batch slot: give it exactly `pages`.
    sized = dataclasses.replace(config, kv_cache_tokens=(pages - config.max_num_seqs) * config.page_size)
    per_request = -(-request_tokens // config.page_size)
    logger.info(
        "KV cache: %d pages x %d = %d tokens (%.2f GiB) from %.0f%% of %.1f GiB after a profile peak of %.2f GiB "
        "(%d tokens in %d sequences); holds %d requests of %d tokens at once (max_num_seqs %d)",
        pages, config.page_size, pages * config.page_size, pages * page_bytes / GiB, 100 * utilization,
        total / GiB, peak / GiB, config.max_num_batched_tokens, config.max_num_seqs,
        pages // per_request, request_tokens, config.max_num_seqs)
    return sized


def device_memory(device: torch.device) -> MemorySource | None:
    """The memory source the engine sizes the pool from: CUDA's, else none
    (on CPU the pool is ``kv_cache_tokens``, as given)."""
    return CudaMemory(device) if device.type == "cuda" else None
