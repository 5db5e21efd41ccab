"""The batched step's pieces against plain, obviously-correct versions."""
from __future__ import annotations

import pytest
import torch

from sampler.block_diffusion import StepRows, denoise_step, factor_quota, top_k_top_p_filter
from sampler.params import DiffusionParams
from sampler.reference import generate
from server.engine.llm import LLM


def plain_factor_quota(conf: list[float], f: float) -> int:
    ranked = sorted(conf, reverse=True)
    n = 0
    while n < len(ranked) and ranked[n] >= 1 - f / (n + 2):
        n += 1
    return max(n, 1)


def test_factor_quota_matches_plain_rule():
    g = torch.Generator().manual_seed(0)
    groups = [torch.rand(n, generator=g).tolist() for n in (1, 5, 8, 3)]
    groups.append([0.99, 0.97, 0.9, 0.2])  # passes 3 with f = 1: 0.99 >= 0.5, 0.97 >= 0.667, 0.9 >= 0.75
    conf = torch.tensor([c for grp in groups for c in grp])
    row_seq = torch.tensor([i for i, grp in enumerate(groups) for _ in grp])
    factors = torch.tensor([1.0, 2.5, 0.5, 1.0, 1.0])
    got = factor_quota(conf, row_seq, factors).tolist()
    assert got == [plain_factor_quota(grp, f) for grp, f in zip(groups, factors.tolist())]
    assert got[-1] == 3
    assert factor_quota(conf, row_seq, torch.zeros(5)).tolist() == [0] * 5


def test_top_k_top_p_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.9]])
    k = top_k_top_p_filter(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isinf(k[0]).tolist() == [True, False, False, True] and not torch.isinf(k[1]).any()
    p = top_k_top_p_filter(logits, torch.tensor([0, 0]), torch.tensor([0.5, 0.5]))
    assert torch.isinf(p[1]).tolist() == [True, True, False, True]  # 5.0 alone holds >= half the mass


def _rows(n_rows: int, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> StepRows:
    return StepRows.build([list(range(n_rows))], [1], [temperature], [seed], [seed + 1], ["low_confidence"],
                          torch.device("cpu"), top_ks=[top_k], top_ps=[top_p])


def test_top_k_samples_only_among_the_k_best():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, dim=1).indices
    seen = set()
    for seed in range(40):
        x0, _, prob = denoise_step(logits, _rows(6, 5.0, top_k=3, seed=seed))
        assert all(x0[r] in top3[r] for r in range(6))
        seen |= set(x0.tolist())
        assert torch.allclose(prob, logits.softmax(1).gather(1, x0[:, None]).squeeze(1))
    assert len(seen) > 6  # it did sample, not argmax
    greedy = denoise_step(logits, _rows(6, 5.0, top_k=1))[0]
    assert torch.equal(greedy, logits.argmax(1))


@pytest.mark.parametrize("remasking", ["margin", "entropy"])
def test_confidence_rules_match_reference(golden_dir, remasking):
    llm = LLM(str(golden_dir), dtype="float64", device="cpu")
    prompt = [204, 68, 268, 43, 100, 190, 179]
    params = DiffusionParams(gen_length=16, steps=8, block_length=8, remasking=remasking)
    x = generate(llm.engine.model.forward_dense, torch.tensor([prompt]), None, steps=8, gen_length=16,
                 block_length=8, remasking=remasking, mask_id=310)
    assert llm.generate([prompt], params)[0].token_ids == x[0, len(prompt):].tolist()


def test_select_commits_one_sequence_matches_grouped_path():
    """The one-sequence shortcut of select_commits (no regrouping) commits
    what the grouped path does, ties, -inf rows and both rules included
    (a second, empty sequence forces the grouped path)."""
    from kernels.reference import select_commits
    g = torch.Generator().manual_seed(1)
    for t in range(300):
        n = int(torch.randint(1, 40, (1,), generator=g))
        conf = torch.randint(0, 5, (n,), generator=g).float() / 4  # many ties
        if t % 3 == 0:
            conf[torch.rand(n, generator=g) < 0.2] = float("-inf")
        q = int(torch.randint(0, n + 2, (1,), generator=g))
        tau = [0.0, 0.5, 0.9][t % 3]
        row_seq = torch.zeros(n, dtype=torch.int64)
        one = select_commits(conf, row_seq, torch.tensor([q]), torch.tensor([tau]))
        grouped = select_commits(conf, row_seq, torch.tensor([q, 0]), torch.tensor([tau, 0.0]))
        assert torch.equal(one, grouped), (conf, q, tau)
        if t % 3:  # no -inf rows: the count each rule gives
            assert int(one.sum()) == (min(q, n) if tau == 0 else max(1, int((conf >= tau).sum())))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_step_rows_host_flags_and_tensors(device):
    """StepRows' host-known flags and its tensors as the per-sequence lists
    say, spread to rows in order (CPU tensors are views of host arrays; on
    a GPU one copy per dtype, split)."""
    rows = StepRows.build([[0, 2], [], [1, 3, 5]], [1, 0, 2], [0.0, 0.0, 0.5], [11, 12, 13], [21, 22, 23],
                          ["low_confidence", "threshold", "factor"], torch.device(device), top_ks=[0, 3, 0],
                          top_ps=[1.0, 1.0, 0.9], thresholds=[0.0, 0.8, 0.7], factors=[0.0, 0.0, 1.5])
    assert rows.any_sampled and rows.any_filter and rows.any_factor
    assert rows.row_seq.tolist() == [0, 0, 2, 2, 2] and rows.row_offset.tolist() == [0, 2, 1, 3, 5]
    assert rows.seed.tolist() == [11, 11, 13, 13, 13] and rows.random_seed.tolist() == [21, 21, 23, 23, 23]
    assert rows.temperature.tolist() == [0.0, 0.0, 0.5, 0.5, 0.5] and rows.top_k.tolist() == [0, 0, 0, 0, 0]
    assert rows.top_p.dtype == torch.float32 and rows.top_p.tolist() == pytest.approx([1.0, 1.0, 0.9, 0.9, 0.9])
    assert rows.quota.tolist() == [1, 0, 2] and rows.quota.dtype == torch.int64
    assert rows.threshold.tolist() == pytest.approx([0.0, 0.8, 0.0]) and rows.factor.tolist() == [0.0, 0.0, 1.5]
    assert all(t.device.type == device for t in (rows.row_seq, rows.temperature, rows.quota, rows.factor))
    greedy = StepRows.build([[0, 1]], [1], [0.0], [1], [2], ["low_confidence"], torch.device("cpu"))
    assert not (greedy.any_sampled or greedy.any_filter or greedy.any_factor)
