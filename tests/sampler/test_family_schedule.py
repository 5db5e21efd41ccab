"""The other families' schedules as plain integers: Dream's float32
timesteps and quota (against torch and the golden per-step counts), the
LLaDA2 block grid, and the new fields' validation."""
from __future__ import annotations

import json

import pytest
import torch

from sampler.params import DiffusionParams
from sampler.schedule import dream_quota, dream_timesteps, grid_blocks
from tests.conftest import golden_path


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.2])
def test_dream_timesteps_are_torch_linspace_in_float32(eps):
    for steps in range(1, 300):
        assert dream_timesteps(steps, eps) == torch.linspace(1, eps, steps + 1).tolist(), steps


@pytest.mark.golden
def test_dream_quota_reproduces_the_golden_per_step_counts():
    for case in json.loads((golden_path("dream") / "generate_cases.json").read_text())["cases"]:
        p = case["params"]
        if p["alg"] == "origin":
            continue
        masked, counts = p["max_new_tokens"], []
        ts = dream_timesteps(p["steps"], p["eps"])
        for step in range(p["steps"]):
            k = dream_quota(masked, ts, step)
            counts.append(k)
            masked -= k
        assert counts == [row[0] for row in case["unmasked_per_step"]], case["name"]


def test_grid_blocks_cover_the_padded_canvas_on_a_grid_from_zero():
    for prompt_len in range(0, 20):
        for gen in range(1, 20):
            for block in (1, 3, 8):
                blocks, padded = grid_blocks(prompt_len, gen, block)
                assert (prompt_len + padded) % block == 0 and gen <= padded < gen + block
                assert blocks[0][0] == 0 and blocks[-1][1] == padded
                for (a, b), (c, _) in zip(blocks, blocks[1:]):
                    assert b == c and (prompt_len + c) % block == 0
                assert all(0 < b - a <= block for a, b in blocks)


@pytest.mark.parametrize("fields,message", [
    ({"schedule": "sdar"}, "schedule: unknown schedule 'sdar'"),
    ({"remasking": "origin"}, "remasking: 'origin' needs the dream schedule"),
    ({"remasking": "threshold_quota", "schedule": "dream"}, "remasking: 'threshold_quota' does not fit the dream"),
    ({"remasking": "threshold_quota"}, "remasking: 'threshold_quota' needs the llada2 schedule"),
    ({"editing_threshold": 0.9}, "editing_threshold: token editing needs the llada2 schedule"),
    ({"schedule": "llada2", "editing_threshold": 1.5}, "editing_threshold: must be a number in (0, 1]"),
    ({"max_post_steps": -1}, "max_post_steps: must be an integer"),
    ({"num_to_transfer": 0}, "num_to_transfer: must be a positive integer"),
    ({"schedule": "dream", "alg_temp": -1.0}, "alg_temp: must be a number"),
    ({"schedule": "dream", "eps": 0}, "eps: must be a number in (0, 1)"),
    ({"schedule": "dream", "cfg_scale": 1.0}, "cfg_scale: classifier-free guidance needs the llada schedule"),
])
def test_family_fields_are_validated_by_name(fields, message):
    with pytest.raises(ValueError) as e:
        DiffusionParams(**fields)
    assert str(e.value).startswith(message)


def test_llada2_steps_are_per_block():
    # 4 blocks, 2 steps each: LLaDA's rule (steps >= blocks over the whole answer) does not apply.
    DiffusionParams(schedule="llada2", remasking="threshold_quota", gen_length=32, block_length=8, steps=2)
