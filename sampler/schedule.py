"""What each denoising step does, as plain integers (no torch): the blocks,
the steps given to each block, the tokens committed at each step, and the
per-step noise seed.

Generalizes the reference where it asserts: a last block shorter than
``block_length`` when ``gen_length`` is not a multiple of it, and ``steps``
not divisible by the number of blocks (the remainder goes to the first
blocks). Where the reference's asserts hold, the schedule is exactly its.
"""
from __future__ import annotations

_MASK64 = (1 << 64) - 1


def block_bounds(gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """[start, end) of each block, relative to the start of the generated part."""
    return [(s, min(s + block_length, gen_length)) for s in range(0, gen_length, block_length)]


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts``, the remainder to the first parts
    (the reference's get_num_transfer_tokens)."""
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def steps_per_block(steps: int, num_blocks: int) -> list[int]:
    return split_evenly(steps, num_blocks)


def commit_quota(num_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of a block's steps."""
    return split_evenly(num_masked, steps)


def commit_quota_at(num_masked: int, steps: int, step: int) -> int:
    """``commit_quota(num_masked, steps)[step]`` in O(1), for any number of steps.
    The quota never grows along a block: once it is 0, it stays 0."""
    base, rem = divmod(num_masked, steps)
    return base + (1 if step < rem else 0)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The Philox seed of one request's step, as a signed 64-bit int.

    A splitmix64 of (seed, step, stream): stream 0 is the Gumbel noise of
    sampling, stream 1 the scores of ``random`` remasking. Keyed by the
    request's global step index, so skipping a step that commits nothing
    changes no other step's noise.
    """
    x = (seed + 0x9E3779B97F4A7C15 * (2 * step + stream + 1)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x - (1 << 64) if x >= (1 << 63) else x
