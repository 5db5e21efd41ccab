"""The commit schedule and parameter validation."""
from __future__ import annotations

import pytest

from sampler.params import DiffusionParams
from sampler.schedule import block_bounds, commit_quota, step_seed, steps_per_block


def test_quota_matches_reference_rule():
    # get_num_transfer_tokens: base = n // steps, the remainder to the first steps
    assert commit_quota(8, 3) == [3, 3, 2]
    assert commit_quota(15, 4) == [4, 4, 4, 3]
    assert commit_quota(2, 4) == [1, 1, 0, 0]
    assert sum(commit_quota(32, 7)) == 32


def test_blocks_generalize_the_reference():
    assert block_bounds(32, 8) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert block_bounds(20, 8) == [(0, 8), (8, 16), (16, 20)]  # a shorter last block
    assert block_bounds(10, 64) == [(0, 10)]
    assert steps_per_block(10, 3) == [4, 3, 3]  # the remainder to the first blocks
    assert steps_per_block(12, 3) == [4, 4, 4]


def test_step_seeds_are_distinct_and_signed_64_bit():
    seeds = {step_seed(s, t, k) for s in (0, 1, 2**63 + 5) for t in range(50) for k in (0, 1)}
    assert len(seeds) == 300
    assert all(-(2**63) <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("fields,message", [
    ({"gen_length": 0}, "gen_length: must be a positive integer"),
    ({"gen_length": 1.5}, "gen_length: must be a positive integer"),
    ({"block_length": -1}, "block_length: must be a positive integer"),
    ({"steps": 0}, "steps: must be a positive integer"),
    ({"gen_length": 64, "block_length": 8, "steps": 4}, "steps: 4 steps cannot cover 8 blocks"),
    ({"temperature": -0.1}, "temperature: must be a number in [0, 100]"),
    ({"temperature": "hot"}, "temperature: must be a number"),
    ({"cfg_scale": -1}, "cfg_scale: must be a number"),
    ({"remasking": "lowest"},
     "remasking: unknown strategy 'lowest'; one of entropy, factor, low_confidence, margin, maskgit_plus, origin, random, threshold, threshold_quota, topk_margin"),
    ({"threshold": 0}, "threshold: must be a number in (0, 1]"),
    ({"factor": -1}, "factor: must be a positive number"),
    ({"decoding": "fast"}, "decoding: unknown mode 'fast'; one of exact, prefix_cache, dual_cache"),
    ({"decoding": "dual_cache", "cfg_scale": 1.0}, "cfg_scale: classifier-free guidance needs decoding 'exact'"),
    ({"seed": 2**64}, "seed: must be an integer that fits in 64 bits"),
    ({"seed": True}, "seed: must be an integer"),
])
def test_params_validation(fields, message):
    with pytest.raises(ValueError) as err:
        DiffusionParams(**fields)
    assert message in str(err.value)


def test_params_defaults():
    p = DiffusionParams(gen_length=48)
    assert p.steps == 48 and isinstance(p.seed, int)
    assert DiffusionParams(seed=7).seed == 7
