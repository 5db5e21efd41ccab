"""A request's kept per-step state against a fresh computation: the block's
masked positions it carries across steps (a commit removes what it fills)
equal a scan of the canvas at every step, and the scheduler's ScheduledSeq,
refreshed in place, equals one built anew."""
import dataclasses
import random

import pytest

from sampler.params import DiffusionParams
from server.engine.messages import ScheduledSeq
from server.engine.request import Request
from server.engine.scheduler import Scheduler, SchedulerConfig

MASK = 99


def scan(req: Request) -> list[int]:
    """The current block's masked positions, read off the canvas."""
    b0, b1 = req.block_range
    return [i for i in range(b0, b1) if req.canvas[i] == MASK]


def fresh(req: Request) -> ScheduledSeq:
    """The step's ScheduledSeq built from scratch (what the scheduler refreshes in place)."""
    p = req.params
    seed, random_seed = req.seeds()
    return ScheduledSeq(
        req_id=req.req_id, canvas=req.canvas, prompt_len=req.prompt_len, rows=scan(req), quota=req.quota(),
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seed, random_seed=random_seed,
        remasking=p.remasking, cfg_scale=p.cfg_scale, threshold=p.threshold, factor=p.factor,
        block=req.block_range, decoding=p.decoding, cache_action=req.cache_action(), pages=req.pages,
        schedule=p.schedule, block_length=p.block_length, kv_len=req.kv_len,
        edit_rows=[i for i in range(max(req.block_range[0], req.prompt_len), req.block_range[1])
                   if req.canvas[i] != MASK] if req.editing else [],
        editing_threshold=p.editing_threshold or 0.0, transfer_prob=req.transfer_prob(), alg_temp=p.alg_temp,
        num_logprobs=p.logprobs)


PARAMS = {
    "llada": DiffusionParams(gen_length=24, steps=12, block_length=8, decoding="dual_cache", seed=1),
    "empty-steps": DiffusionParams(gen_length=16, steps=40, block_length=8, seed=5),  # zero-quota steps skipped
    "threshold": DiffusionParams(gen_length=24, steps=24, block_length=8, remasking="threshold", seed=2),
    "llada2-editing": DiffusionParams(gen_length=20, steps=6, block_length=8, schedule="llada2",
                                      editing_threshold=0.5, decoding="prefix_cache", seed=3),
    "dream": DiffusionParams(gen_length=16, steps=8, block_length=16, schedule="dream", remasking="origin", seed=4),
}


@pytest.mark.parametrize("name", PARAMS)
def test_kept_state_equals_a_fresh_scan(name):
    rng = random.Random(name)
    req = Request("r", [5, 6, 7], PARAMS[name], MASK, frozenset())
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4096))
    sched.add(req)
    for _ in range(200):
        out = sched.schedule()
        if req.is_done:
            break
        (s,) = out.seqs
        assert s is req.scheduled and dataclasses.asdict(s) == dataclasses.asdict(fresh(req))
        # Commit some masked rows, sometimes a mask id (the position stays masked), and with
        # editing re-write a decoded position as well.
        rows = list(s.rows)
        picked = sorted(rng.sample(rows, min(len(rows), rng.randint(0, max(s.quota, 1)))))
        tokens = [MASK if rng.random() < 0.2 else rng.randint(10, 20) for _ in picked]
        if s.edit_rows and rng.random() < 0.5:
            picked, tokens = zip(*sorted([*zip(picked, tokens), (rng.choice(s.edit_rows), 21)]))
        before = list(s.rows)
        req.commit(list(picked), list(tokens))
        assert s.rows == before  # what the step was handed stays as it was
        if not req.is_done:
            assert req.masked_positions() == scan(req)
    assert req.is_done
