"""The step budget: max_num_batched_tokens bounds the tokens each step puts
through the model (whole canvas for exact steps and cache fills, block or
block + suffix for cache use steps); cache modes batch more requests than
the sum of their canvases allows; deferred fills never starve anyone and
never change a request's output."""
from __future__ import annotations

import random

import pytest

from sampler.params import DiffusionParams, LikelihoodParams
from server.engine.likelihood import LikelihoodRequest, owner_of
from server.engine.llm import LLM
from server.engine.messages import RunnerOutput, ScheduledSeq
from server.engine.request import Request
from server.engine.scheduler import Scheduler, SchedulerConfig

MASK = 310


def step_cost(s: ScheduledSeq) -> int:
    """What the model computes for one scheduled sequence, restated from
    DESIGN's table rather than taken from the scheduler."""
    b0, b1 = s.block
    if s.cache_action == "use":
        return b1 - b0 if s.decoding == "dual_cache" else len(s.canvas) - b0
    return len(s.canvas) * (2 if s.cfg_scale > 0 else 1)


def random_params(rng: random.Random) -> DiffusionParams:
    decoding = rng.choice(["exact", "prefix_cache", "dual_cache", "dual_cache"])
    gen = rng.choice([8, 16, 24, 40])
    block = rng.choice([4, 8, 16])
    return DiffusionParams(gen_length=gen, block_length=block, steps=max(-(-gen // block), gen // rng.choice([1, 2])),
                           decoding=decoding, cfg_scale=0.5 if decoding == "exact" and rng.random() < 0.3 else 0.0,
                           remasking=rng.choice(["low_confidence", "low_confidence", "threshold"]), seed=1)


def drive(sched: Scheduler, requests: list[Request], rng: random.Random) -> tuple[int, dict[str, int], int]:
    """Runs the scheduler to the end with a fake runner that commits each
    row's quota. Returns (largest step in tokens, req_id -> longest run of
    engine steps it spent running but not stepped, most requests running)."""
    for r in requests:
        sched.add(r)
    largest, most_running, idle, longest = 0, 0, {}, {}
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        scored = sum(len(c.sample_ids) * len(c.seq_ids) * (2 if c.cfg_scale > 0 else 1) for c in out.scores)
        largest = max(largest, scored + sum(step_cost(s) for s in out.seqs))
        most_running = max(most_running, len(sched.running))
        stepped = {owner_of(s.req_id) for s in out.seqs} | {c.req_id for c in out.scores}
        for r in sched.running:
            idle[r.req_id] = 0 if r.req_id in stepped else idle.get(r.req_id, 0) + 1
            longest[r.req_id] = max(longest.get(r.req_id, 0), idle[r.req_id])
        result = RunnerOutput(scores={c.req_id: [1.0] * len(c.sample_ids) for c in out.scores})
        for s in out.seqs:
            n = rng.randint(1, s.quota) if s.remasking == "threshold" else s.quota  # threshold: adaptive
            take = s.rows[:n]
            result.commits[s.req_id] = (take, [rng.randrange(300) for _ in take])
        sched.update(result)
    assert not sched.has_unfinished(), "the workload did not finish"
    return largest, longest, most_running


@pytest.mark.parametrize("seed", range(6))
def test_no_step_exceeds_the_budget_and_nothing_starves(seed):
    rng = random.Random(seed)
    budget = rng.choice([80, 120, 200])
    config = SchedulerConfig(max_num_seqs=rng.choice([4, 8, 16]), max_num_batched_tokens=budget,
                             kv_cache_tokens=4096, page_size=4)
    sched = Scheduler(config)
    requests = []
    for i in range(40):
        params = random_params(rng)
        prompt = [rng.randrange(300) for _ in range(rng.randrange(1, 12))]
        if rng.random() < 0.15:  # a likelihood estimate: whole-sequence samples, a greedy check
            req = LikelihoodRequest(f"r{i}", prompt, [rng.randrange(300) for _ in range(rng.randrange(1, 6))],
                                    LikelihoodParams(mc_num=rng.choice([1, 4, 8]), cfg_scale=rng.choice([0.0, 0.5]),
                                                     check_greedy=rng.random() < 0.5, seed=1), MASK, budget)
            if req.min_step_tokens <= budget:
                requests.append(req)
            continue
        req = Request(f"r{i}", prompt, params, MASK, frozenset())
        if req.num_tokens <= budget:
            requests.append(req)
    largest, longest, _ = drive(sched, requests, rng)
    assert largest <= budget
    # A deferred fill waits at most as many engine steps as fills ahead of it.
    assert max(longest.values()) < config.max_num_seqs
    assert all(r.status.is_finished for r in requests)
    assert sched.pages.num_free == sched.pages.num_pages


def test_cache_modes_batch_past_the_sum_of_canvases():
    """dual_cache requests whose canvases together are 4x the budget all run
    at once; their fills, which would not fit together, are spread out."""
    budget, canvas, block = 256, 64, 8
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, kv_cache_tokens=16 * canvas)
    sched = Scheduler(config)
    params = DiffusionParams(gen_length=canvas - 4, block_length=block, decoding="dual_cache", seed=0)
    requests = [Request(f"r{i}", [1, 2, 3, 4], params, MASK, frozenset()) for i in range(16)]
    largest, longest, most_running = drive(sched, requests, random.Random(0))
    assert most_running == 16 and 16 * canvas == 4 * budget
    assert largest <= budget
    assert 0 < max(longest.values()) < 16  # some fills were deferred, none for long
    # The old rule (the sum of canvases) would have admitted budget // canvas requests.
    exact = Scheduler(config)
    exact_params = DiffusionParams(gen_length=canvas - 4, block_length=block, seed=0)
    _, _, most_exact = drive(exact, [Request(f"e{i}", [1, 2, 3, 4], exact_params, MASK, frozenset())
                                     for i in range(16)], random.Random(0))
    assert most_exact == budget // canvas


def test_deferred_fills_do_not_change_outputs(golden_dir):
    """Under a budget that forces fills to wait, every request still gets
    the tokens it gets alone, and no forward computes more than the budget."""
    prompts = [[204, 68, 268, 43, 100, 190, 179], [35, 225, 26, 25, 197], [221, 63, 12, 244], [58, 1, 2, 3, 4, 5]]
    params = [DiffusionParams(gen_length=24, block_length=8, steps=12, decoding=d, seed=7 + i,
                              temperature=0.5 * (i % 2)) for i, d in
              enumerate(["dual_cache", "prefix_cache", "dual_cache", "dual_cache"])]
    budget = 72
    llm = LLM(str(golden_dir), dtype="float32", device="cpu", max_num_seqs=8, max_num_batched_tokens=budget)
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    sizes = []
    model = llm.engine.model
    real = model.forward

    def forward(input_ids, *args, **kwargs):
        sizes.append(input_ids.numel())
        return real(input_ids, *args, **kwargs)

    model.forward = forward
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    assert max(sizes) <= budget
    # The four canvases (118 tokens) exceed the budget together, yet all ran at once:
    # fewer forwards than four requests' 12 steps run two at a time would take.
    assert sum(len(p) + 24 for p in prompts) > budget and len(sizes) < 24
