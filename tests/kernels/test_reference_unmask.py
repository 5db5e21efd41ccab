"""The unmask twin's CPU shortcuts against plain torch: the row argmax
(numpy's vectorized one on CPU) picks exactly torch.argmax's index, ties,
-inf rows, +inf and NaN included, and the twin's greedy scores are the
argmax and its softmax probability computed the obvious way."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import ops, reference


def awkward_logits(num_rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Integer-valued logits (many ties), with whole -inf rows, scattered
    -inf, +inf and NaN entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (num_rows, vocab), generator=g).to(dtype)
    x[torch.rand(num_rows, vocab, generator=g) < 0.2] = float("-inf")
    x[::5] = float("-inf")
    x[1::7, torch.randint(0, vocab, (1,), generator=g)] = float("inf")
    x[2::11, torch.randint(0, vocab, (1,), generator=g)] = float("nan")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab", [1, 7, 4096])
def test_row_argmax_is_torch_argmax(dtype, vocab):
    for seed in range(5):
        x = awkward_logits(37, vocab, dtype, seed)
        assert torch.equal(reference.row_argmax(x), x.argmax(dim=1))
        assert torch.equal(reference.row_argmax(x.t().contiguous().t()), x.argmax(dim=1))  # column-major rows
        noise = torch.randn(37, vocab, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(reference.row_argmax(noise), noise.argmax(dim=1))
    assert reference.row_argmax(torch.zeros(0, vocab, dtype=dtype)).shape == (0,)
    half = awkward_logits(9, vocab, torch.float16, 0)  # not numpy's: torch's own
    assert torch.equal(reference.row_argmax(half), half.argmax(dim=1))


def test_greedy_scores_are_argmax_and_its_softmax_probability():
    x = awkward_logits(40, 300, torch.float32, 3)
    x = torch.where(torch.isnan(x) | (x == float("inf")), torch.zeros_like(x), x)
    x[::5, 0] = 2.0  # no whole -inf rows, no +inf or NaN: their probability is NaN by either route
    zeros = torch.zeros(40, dtype=torch.int64)
    out = reference.unmask_scores(x, torch.zeros(40), zeros, zeros)
    assert torch.equal(out["x0"], x.argmax(dim=1))
    want = torch.softmax(x.double(), dim=1).gather(1, x.argmax(dim=1)[:, None]).squeeze(1).float()
    torch.testing.assert_close(out["prob"], want, atol=1e-6, rtol=1e-6)


def adversarial_selection(g: torch.Generator, num_seqs: int, num_rows: int, grouped: bool):
    """select_commits arguments with many ties, -inf, +inf, NaN and signed
    zeros among the confidences, quotas from negative to past the rows,
    and a threshold per sequence that is off (0 or negative) or on."""
    values = torch.tensor([0.0, -0.0, 0.25, 0.5, 0.75, 1.0, float("inf"), float("-inf"), float("nan")])
    weights = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 2.0, 1.0])
    conf = values[torch.multinomial(weights, num_rows, replacement=True, generator=g)] if num_rows else values[:0]
    row_seq = torch.randint(0, num_seqs, (num_rows,), generator=g)
    if grouped:
        row_seq = row_seq.sort().values
    quota = torch.randint(-1, num_rows // num_seqs + 3, (num_seqs,), generator=g)
    threshold = torch.tensor([0.0, -0.5, 0.5, 0.75, 1.0, float("inf")])[torch.randint(0, 6, (num_seqs,), generator=g)]
    return conf, row_seq, quota, threshold


def test_select_commits_host_is_the_torch_twin():
    """The numpy select (the CPU path) commits exactly the torch twin's
    rows: one sequence and many, grouped and interleaved, ties to the lower
    row, NaN ranked first as torch's descending sort does, -inf, zero and
    oversized quotas, both rules."""
    g = torch.Generator().manual_seed(0)
    for t in range(600):
        num_seqs = 1 if t % 3 == 0 else int(torch.randint(2, 9, (1,), generator=g))
        num_rows = int(torch.randint(0, 70, (1,), generator=g))
        conf, row_seq, quota, threshold = adversarial_selection(g, num_seqs, num_rows, grouped=t % 2 == 0)
        for tau in (None, threshold):
            want = reference.select_commits(conf, row_seq, quota, tau)
            got = reference.select_commits_host(conf.numpy(), row_seq.numpy(), quota.numpy(),
                                                None if tau is None else tau.numpy())
            assert got.dtype == bool and torch.equal(torch.from_numpy(got), want), (conf, row_seq, quota, tau)
            assert torch.equal(ops.select_commits(conf, row_seq, quota, tau), want)  # CPU tensors: the numpy path


def test_select_commits_host_ranks_nan_first_and_ties_low():
    conf = np.array([0.5, np.nan, 0.9, 0.9, np.nan], dtype=np.float32)
    one = np.zeros(5, dtype=np.int64)
    assert reference.select_commits_host(conf, one, np.array([3])).tolist() == [False, True, True, False, True]
    assert reference.select_commits_host(conf[[0, 2, 3]], one[:3], np.array([1])).tolist() == [False, True, False]
    two = np.array([0, 0, 1, 1, 1])
    got = reference.select_commits_host(conf, two, np.array([1, 1]), np.array([0.0, 0.95], dtype=np.float32))
    assert got.tolist() == [False, True, False, False, True]  # seq 1: nothing >= 0.95, its first (NaN) row


def test_select_commits_host_past_16_bit_sequence_ids():
    """More sequences than 16-bit keys hold: the grouping sort takes its
    int64 path and still matches the twin."""
    g = torch.Generator().manual_seed(3)
    num_seqs = 2**15 + 7
    conf, _, _, threshold = adversarial_selection(g, 4, 300, grouped=False)
    row_seq = torch.randint(num_seqs - 40, num_seqs, (300,), generator=g)  # ids past 2**15 - 1
    quota = torch.randint(0, 4, (num_seqs,), generator=g)
    threshold = threshold.repeat(num_seqs // 4 + 1)[:num_seqs]
    for tau in (None, threshold):
        want = reference.select_commits(conf, row_seq, quota, tau)
        assert torch.equal(ops.select_commits(conf, row_seq, quota, tau), want)


def test_any_sampled_from_the_host_gives_the_same_scores():
    """A caller that knows on the host whether any row samples (StepRows)
    gets bit-identical scores to the twin's own read of the temperatures:
    greedy batches, mixed ones, and all sampled."""
    logits = torch.randn(12, 300, generator=torch.Generator().manual_seed(4))
    seeds, offsets = torch.arange(12) * 7 + 1, torch.arange(12)
    for temps in ([0.0] * 12, [0.0, 0.7] * 6, [1.3] * 12):
        temperature = torch.tensor(temps)
        want = reference.unmask_scores(logits, temperature, seeds, offsets, with_margin=True, with_entropy=True)
        got = reference.unmask_scores(logits, temperature, seeds, offsets, with_margin=True, with_entropy=True,
                                      any_sampled=max(temps) > 0)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        if max(temps) > 0:  # the flag is what decides: saying "none" gives the greedy argmax
            greedy = reference.unmask_scores(logits, temperature, seeds, offsets, any_sampled=False)
            assert torch.equal(greedy["x0"], logits.argmax(dim=1)) and not torch.equal(greedy["x0"], want["x0"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_row_pick_is_gather(dtype):
    """row_pick (numpy's fancy index on CPU) copies exactly gather's values,
    -inf, +inf and NaN included; float16 takes torch's own gather."""
    for seed in range(4):
        x = awkward_logits(23, 50, dtype, seed)
        index = torch.randint(0, 50, (23,), generator=torch.Generator().manual_seed(seed))
        want = x.gather(1, index[:, None]).squeeze(1)
        got = reference.row_pick(x, index)
        assert got.dtype == dtype and got.shape == (23,)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert reference.row_pick(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64)).shape == (0,)
