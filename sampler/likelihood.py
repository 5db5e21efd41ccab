"""LLaDA's Monte Carlo estimate of a continuation's log-likelihood bound
(``get_log_likelihood`` of ML-GSAI/LLaDA), in the pieces the engine batches.

For a context c and a continuation y of T tokens, one Monte Carlo sample
masks x of y's tokens (1 <= x <= T; the context is never masked), runs the
mask predictor once on that canvas and scores

    L = sum over masked positions j of -log p(y_j | canvas) / (x / T)

and the estimate is -mean(L) over ``mc_num`` samples. Samples come in
Monte Carlo batches of ``batch_size``: a batch draws one k uniform in 1..T
and gives its rows the stratified counts ``round(linspace(k, k + (b-1) T/b))``
wrapped into 1..T; each row masks a uniformly random set of x positions.

Randomness is the project's counter-based Philox, keyed by (seed, batch
index, row), never by what else runs: sample s (batch s // batch_size, row
s % batch_size) draws the same mask whatever chunk of samples a step runs
and whatever requests share the forward pass. ``sampler.reference`` draws
from the same streams, so the two agree exactly:
- k of batch j: ``1 + (r * T) >> 32`` with r the uint32 of stream
  ``step_seed(seed, j, 0)`` at offset 0;
- the positions of row i of batch j: the permutation that sorts the uint32
  keys of stream ``step_seed(seed, j, 1)`` at offsets ``i * T + t``
  (stable), standing in for the reference's ``torch.randperm(T)``.
"""
from __future__ import annotations

import functools

import torch

from kernels.reference import philox_uint32
from sampler.schedule import step_seed


def batch_start(seed: int, batch: int, num_targets: int) -> int:
    """k of one Monte Carlo batch, uniform in 1..num_targets."""
    r = int(philox_uint32(torch.tensor(step_seed(seed, batch, 0)), torch.tensor(0)))
    return 1 + ((r * num_targets) >> 32)


@functools.lru_cache(maxsize=4096)
def stratified_counts(num_targets: int, batch_size: int, k: int) -> tuple[int, ...]:
    """The masked-token count of each row of a batch that drew ``k``, as the
    reference computes it (float32 linspace, round half to even, wrapped)."""
    k_t = torch.tensor(k, dtype=torch.int64)
    x = torch.round(torch.linspace(float(k_t), k_t + (batch_size - 1) * (num_targets / batch_size),
                                   steps=batch_size)).long()
    x = ((x - 1) % num_targets) + 1
    return tuple(x.tolist())


def draw_masks(seed: int, num_targets: int, batch_size: int, sample_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of the given samples: is_mask (n, num_targets) bool over the
    continuation and num_masked (n,) int64. On the CPU (small; the host
    needs the row lists anyway)."""
    counts = [stratified_counts(num_targets, batch_size, batch_start(seed, s // batch_size, num_targets))
              [s % batch_size] for s in sample_ids]
    num_masked = torch.tensor(counts, dtype=torch.int64)
    stream = torch.tensor([step_seed(seed, s // batch_size, 1) for s in sample_ids], dtype=torch.int64)
    rows = torch.tensor([s % batch_size for s in sample_ids], dtype=torch.int64)
    offsets = rows[:, None] * num_targets + torch.arange(num_targets)[None, :]  # (n, T)
    keys = philox_uint32(stream[:, None], offsets)  # (n, T)
    order = torch.sort(keys, dim=1, stable=True).indices  # each row's stand-in for randperm(T)
    return order < num_masked[:, None], num_masked


def sample_losses(logits: torch.Tensor, targets: torch.Tensor, row_sample: torch.Tensor, p_mask: torch.Tensor,
                  num_samples: int, vocab=None) -> torch.Tensor:
    """Each sample's weighted loss L = sum of its masked rows' cross-entropy
    / p_mask. logits (num_rows, vocab), targets (num_rows,) int64,
    row_sample (num_rows,) the sample of each row, p_mask (num_rows,)
    float32 (x / T, as the reference rounds it). Returns (num_samples,)
    float64. Cross-entropy in float32 at least (the reference uses the
    logits' dtype: the same in float32 and float64). ``vocab``
    (``kernels.vocab_parallel.VocabShard``): the logits are this
    tensor-parallel rank's vocabulary slice."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if vocab is not None:
        ce = -vocab.target_log_probs(logits, targets, dtype)
    else:
        ce = -torch.log_softmax(logits.to(dtype), dim=-1).gather(1, targets[:, None]).squeeze(1)  # (num_rows,)
    weighted = (ce / p_mask.to(ce.device)).to(torch.float64)
    out = torch.zeros(num_samples, dtype=torch.float64, device=logits.device)
    return out.index_add_(0, row_sample, weighted)
