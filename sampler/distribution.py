"""Scores under the sampling distribution, as LLaDA2's and Dream's samplers
compute them (LLaDA's own confidence is the model's unscaled probability,
``kernels.reference.unmask_scores``; theirs is the probability under the
distribution the token is drawn from):

- the logits are divided by the temperature (rows with T > 0), then
  filtered by top-k and top-p (Dream: top-p first, at every temperature;
  LLaDA2: top-k first, only when sampling, as its T = 0 branch skips them);
  top-p keeps the smallest prefix of the sorted tokens whose cumulative
  probability exceeds p (a token is dropped when the mass before it does);
- ``prob`` is the filtered distribution's probability of x0, ``margin`` its
  top-1 minus top-2, ``entropy`` -sum p log(p + 1e-10) (Dream's epsilon);
- x0 is the argmax (T = 0) or drawn by Gumbel-max from the filtered,
  tempered logits with the project's counter-based noise (the references
  draw with torch.multinomial: the same distribution, other draws).

A torch-only path: the Triton unmask kernel covers LLaDA's scores; these
rows are few (the families' steps commit many tokens at once).
"""
from __future__ import annotations

import torch

from kernels.reference import gumbel_noise


def filter_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Tokens below each row's k-th largest logit to -inf (k <= 0: none). (rows, vocab)"""
    k = top_k.clamp(min=1, max=logits.shape[1])
    kth = logits.sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])
    return torch.where((top_k[:, None] > 0) & (logits < kth), float("-inf"), logits)


def filter_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tokens after the smallest prefix whose probability exceeds p to -inf
    (p >= 1: none). (rows, vocab)"""
    sorted_logits, order = logits.sort(dim=1, descending=True)
    cum = sorted_logits.softmax(dim=1).cumsum(dim=1)
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[:, 1:] = cum[:, :-1] > top_p[:, None]
    drop &= top_p[:, None] < 1
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def sampling_scores(
    logits: torch.Tensor,  # (rows, vocab)
    temperature: torch.Tensor,  # (rows,) float32; 0 = greedy
    top_k: torch.Tensor,  # (rows,) int64; <= 0 = no limit
    top_p: torch.Tensor,  # (rows,) float32; 1 = no limit
    seed: torch.Tensor,  # (rows,) int64 Philox seed of the row's request and step
    row_offset: torch.Tensor,  # (rows,) int64 the row's position in the generated part
    top_p_first: torch.Tensor,  # (rows,) bool: Dream's order and filtering at T = 0 too
) -> dict[str, torch.Tensor]:
    """x0 (int64), prob, margin, entropy per row, as the module says; the
    scores in the logits' precision (float64 logits: float64), so a
    threshold compares as the reference compares."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(work)
    sampled = temperature > 0
    t = torch.where(sampled, temperature, torch.ones_like(temperature)).to(work)[:, None]
    scaled = logits / t
    filtering = sampled | top_p_first
    k = torch.where(filtering, top_k, torch.zeros_like(top_k))
    p = torch.where(filtering, top_p, torch.ones_like(top_p))
    dream = top_p_first[:, None]
    filtered = torch.where(dream, filter_top_k(filter_top_p(scaled, p), k), filter_top_p(filter_top_k(scaled, k), p))
    log_probs = torch.log_softmax(filtered, dim=1)
    probs = log_probs.exp()
    x0 = probs.argmax(dim=1)
    if bool(sampled.any()):
        rows = sampled.nonzero().squeeze(1)
        noise = gumbel_noise(seed[rows], row_offset[rows], logits.shape[1]).to(work)
        x0[rows] = (filtered[rows] + noise).argmax(dim=1)
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    second = top2[:, 1] if top2.shape[1] > 1 else torch.zeros_like(top2[:, 0])
    return {
        "x0": x0,
        "prob": probs.gather(1, x0[:, None]).squeeze(1),
        "margin": top2[:, 0] - second,
        "entropy": -(probs * torch.log(probs + 1e-10)).sum(dim=1),
    }


def gumbel_rank(confidence: torch.Tensor, uniform: torch.Tensor, alg_temp: torch.Tensor) -> torch.Tensor:
    """Dream's alg_temp > 0: the k positions it commits are drawn without
    replacement from softmax(confidence / alg_temp); the top k of
    confidence / alg_temp + Gumbel noise have exactly that law. Rows with
    alg_temp 0 keep their confidence. All (rows,)."""
    on = alg_temp > 0
    g = -torch.log(-torch.log(uniform.double().clamp_min(1e-300)))
    ranked = confidence.double() / torch.where(on, alg_temp, torch.ones_like(alg_temp)).double() + g
    return torch.where(on, ranked, confidence.double())
