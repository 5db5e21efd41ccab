"""What each denoising step does, as plain integers (no torch): the blocks,
the steps given to each block, the tokens committed at each step, and the
per-step noise seed; also the other families' schedules: LLaDA2's block
grid from position 0 and Dream's timestep schedule (float32 arithmetic
emulated exactly, so the scheduler stays torch-free).

Generalizes the reference where it asserts: a last block shorter than
``block_length`` when ``gen_length`` is not a multiple of it, and ``steps``
not divisible by the number of blocks (the remainder goes to the first
blocks). Where the reference's asserts hold, the schedule is exactly its.
"""
from __future__ import annotations

import struct

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


def grid_blocks(prompt_len: int, gen_length: int, block_length: int) -> tuple[list[tuple[int, int]], int]:
    """LLaDA2's block grid, which starts at canvas position 0 (its attention
    is block-causal over the same grid): the canvas is padded with masks to
    a whole number of blocks, and decoding starts at the block holding the
    first generated position (which may still hold the prompt's tail).
    Returns the blocks' [start, end) relative to the generated part (the
    first one clipped at 0) and the generated part's padded length."""
    num_blocks = -(-(prompt_len + gen_length) // block_length)
    padded = num_blocks * block_length - prompt_len
    first = prompt_len // block_length
    return [(max(k * block_length - prompt_len, 0), (k + 1) * block_length - prompt_len)
            for k in range(first, num_blocks)], padded


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def dream_timesteps(steps: int, eps: float) -> list[float]:
    """``torch.linspace(1, eps, steps + 1)`` in float32 on the CPU, exactly:
    a float32 step, the first half counted up from 1 and the second down
    from eps, each value one fused multiply-add (tested against torch)."""
    start, end, n = 1.0, _f32(eps), steps + 1
    step = _f32(_f32(end - start) / steps)
    return [_f32(start + step * i) if i < n // 2 else _f32(end - step * (steps - i)) for i in range(n)]


def dream_transfer_ratio(timesteps: list[float], step: int) -> float:
    """Dream's ``1 - s / t`` at a step (float32): the share of the still
    masked positions to commit; 1 on the last step (all of them)."""
    if step >= len(timesteps) - 2:
        return 1.0
    t, s = timesteps[step], timesteps[step + 1]
    return _f32(1.0 - _f32(s / t))


def dream_quota(num_masked: int, timesteps: list[float], step: int) -> int:
    """Dream's tokens to commit at a step: int(n * (1 - s / t)) in float32,
    truncated (0 is possible), and every remaining one on the last step."""
    if step >= len(timesteps) - 2:
        return num_masked
    return int(_f32(float(num_masked) * dream_transfer_ratio(timesteps, step)))
