"""Batch-size buckets for static use steps.

A cache use step whose requests each put the same number of tokens through
the model (a dual_cache block, an LLaDA2 prefix_cache grid block) has a
shape that depends only on its batch size. Padded up to a bucket (1, 2, 4,
8, ... up to ``max_num_seqs``), every such step of a bucket has one shape:
what a captured CUDA graph or a shape-specialised compile needs.

Padding sequences are blocks of mask tokens at positions 0.. that attend only
to themselves (no cached keys, nothing stored): attention never crosses
sequences, so they cannot change a real row; their logits are discarded.
The LM head runs on every token of every block (a static row count), and
the sampler takes the real requests' masked rows from it.
"""
from __future__ import annotations

from server.engine.messages import ScheduledSeq


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Powers of two below ``max_num_seqs``, then ``max_num_seqs`` itself."""
    buckets, b = [], 1
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``num_seqs`` sequences."""
    for b in buckets:
        if b >= num_seqs:
            return b
    raise ValueError(f"{num_seqs} sequences exceed the largest bucket {buckets[-1]}")


def static_width(seqs: list[ScheduledSeq], widths: list[int]) -> int | None:
    """The tokens per sequence when every sequence takes a cache use step of
    the same width without guidance (a static step), else None.
    ``widths``: each sequence's tokens this step (its plan's end - start)."""
    if not seqs or any(s.cache_action != "use" or s.cfg_scale > 0 for s in seqs):
        return None
    return widths[0] if all(w == widths[0] for w in widths) else None
