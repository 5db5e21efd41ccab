"""The unmask twin's CPU shortcuts against plain torch: the row argmax
(numpy's vectorized one on CPU) picks exactly torch.argmax's index, ties,
-inf rows, +inf and NaN included, and the twin's greedy scores are the
argmax and its softmax probability computed the obvious way."""
from __future__ import annotations

import pytest
import torch

from kernels import reference


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
