"""One batched denoising step over a ragged batch.

The batch is described row by row: a row is one masked position of the
current block of one sequence, and only rows get logits (the LM head never
runs on the rest of the canvas). Sequences in one step may differ in
everything: canvas length, block, step, quota, temperature, seed, remasking.
A sequence's result depends only on its own rows and its own seed, never on
its batch mates.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from kernels import ops
from kernels.reference import philox_uniform
from kernels.vocab_parallel import VocabShard
from sampler.distribution import gumbel_rank, sampling_scores
from sampler.remasking import REMASKING


@dataclass
class FamilyRows:
    """The other families' per-step settings (LLaDA2, Dream), present only
    when some sequence in the step has a schedule other than LLaDA's."""

    dist: torch.Tensor  # (num_rows,) bool: confidence under the sampling distribution (sampler.distribution)
    top_p_first: torch.Tensor  # (num_rows,) bool: Dream's filter order (and filters at T = 0)
    alg_temp: torch.Tensor  # (num_rows,) float64 Dream's alg_temp; 0 = deterministic top-k
    tq_threshold: torch.Tensor  # (num_seqs,) float64 threshold of the threshold_quota rule; 0 = not that rule
    transfer_prob: torch.Tensor  # (num_seqs,) float32 bernoulli rule's probability; -1 = not that rule
    any_alg_temp: bool

    @classmethod
    def build(cls, counts: list[int], schedules: list[str], remasking: list[str], thresholds: list[float],
              alg_temps: list[float], transfer_probs: list[float], device: torch.device) -> "FamilyRows":
        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([v for v, n in zip(values, counts) for _ in range(n)], dtype=dtype, device=device)

        rules = [REMASKING[r].rule for r in remasking]
        return cls(
            dist=per_row([s != "llada" for s in schedules], torch.bool),
            top_p_first=per_row([s == "dream" for s in schedules], torch.bool),
            alg_temp=per_row(alg_temps, torch.float64),
            tq_threshold=torch.tensor([t if r == "threshold_quota" else 0.0 for t, r in zip(thresholds, rules)],
                                      dtype=torch.float64, device=device),
            transfer_prob=torch.tensor([p if r == "bernoulli" else -1.0 for p, r in zip(transfer_probs, rules)],
                                       dtype=torch.float32, device=device),
            any_alg_temp=any(a > 0 for a in alg_temps),
        )


@dataclass
class StepRows:
    row_seq: torch.Tensor  # (num_rows,) int64 row -> sequence index in the step
    row_offset: torch.Tensor  # (num_rows,) int64 row -> position within its generated part
    temperature: torch.Tensor  # (num_rows,) float32
    seed: torch.Tensor  # (num_rows,) int64 Philox seed of the sequence's step (sampling noise)
    random_seed: torch.Tensor  # (num_rows,) int64 Philox seed of the sequence's step (random remasking)
    top_k: torch.Tensor  # (num_rows,) int64; <= 0 = no limit
    top_p: torch.Tensor  # (num_rows,) float32; 1 = no limit
    quota: torch.Tensor  # (num_seqs,) int64 tokens to commit per sequence (quota rule; the cap otherwise)
    threshold: torch.Tensor  # (num_seqs,) float32 threshold-rule tau; 0 = not that rule
    factor: torch.Tensor  # (num_seqs,) float32 factor-rule f; 0 = not that rule
    remasking: list[str]  # sequence -> strategy name
    any_filter: bool  # some row samples with top-k / top-p (known on the host: no sync)
    any_factor: bool  # some sequence uses the factor rule
    any_sampled: bool  # some row has temperature > 0 (known on the host: no sync)
    family: FamilyRows | None = None  # LLaDA2's / Dream's settings; None = every sequence is LLaDA's

    @classmethod
    def build(
        cls,
        row_offsets: list[list[int]],  # seq -> its rows' positions within the generated part
        quotas: list[int],  # seq -> tokens to commit
        temperatures: list[float],  # seq -> temperature
        seeds: list[int],  # seq -> step seed (stream 0)
        random_seeds: list[int],  # seq -> step seed (stream 1)
        remasking: list[str],  # seq -> strategy name
        device: torch.device,
        top_ks: list[int] | None = None,  # seq -> top_k
        top_ps: list[float] | None = None,  # seq -> top_p
        thresholds: list[float] | None = None,  # seq -> tau of the threshold rule
        factors: list[float] | None = None,  # seq -> f of the factor rule
        schedules: list[str] | None = None,  # seq -> schedule (sampler.params.SCHEDULES)
        alg_temps: list[float] | None = None,  # seq -> Dream's alg_temp
        transfer_probs: list[float] | None = None,  # seq -> the bernoulli rule's probability this step
    ) -> "StepRows":
        counts = [len(r) for r in row_offsets]
        family = None
        if schedules is not None and any(s != "llada" for s in schedules):
            family = FamilyRows.build(counts, schedules, remasking, thresholds or [0.0] * len(counts),
                                      alg_temps or [0.0] * len(counts), transfer_probs or [1.0] * len(counts),
                                      device)

        # Spread to rows on the host in numpy (a torch op costs microseconds, a step's fixed cost; array methods,
        # not numpy's module functions, which add a Python wrapper each), then tensors per dtype (_on_device).
        num_seqs = len(counts)
        rule_of = [REMASKING[r].rule for r in remasking]
        any_sampled = any(t > 0 for t in temperatures)
        zeros = [0.0] * num_seqs
        floats = np.array([temperatures, top_ps or [1.0] * num_seqs,  # (4, num_seqs): temperature, top_p,
                           _where_rule("threshold", thresholds or zeros, rule_of),  # threshold,
                           _where_rule("factor", factors or zeros, rule_of)], dtype=np.float32)  # factor
        ints = np.array([seeds, random_seeds, top_ks or [0] * num_seqs, quotas],
                        dtype=np.int64)  # (4, num_seqs): seed, random_seed, top_k, quota
        row_seq = np.arange(num_seqs, dtype=np.int64).repeat(counts)
        offsets = np.fromiter(itertools.chain.from_iterable(row_offsets), dtype=np.int64, count=len(row_seq))
        row_seq_t, offset_t, seed_t, random_seed_t, top_k_t, quota_t = _on_device(
            [row_seq, offsets, *ints[:3].repeat(counts, axis=1), ints[3]], device)
        temperature_t, top_p_t, threshold_t, factor_t = _on_device(
            [*floats[:2].repeat(counts, axis=1), floats[2], floats[3]], device)
        return cls(
            row_seq=row_seq_t,
            row_offset=offset_t,
            temperature=temperature_t,
            seed=seed_t,
            random_seed=random_seed_t,
            top_k=top_k_t,
            top_p=top_p_t,
            quota=quota_t,
            threshold=threshold_t,
            factor=factor_t,
            remasking=remasking,
            any_filter=any_sampled and any(t > 0 and ((k or 0) > 0 or (p if p is not None else 1.0) < 1)
                                           for t, k, p in zip(temperatures, top_ks or [0] * num_seqs,
                                                              top_ps or [1.0] * num_seqs)),
            any_factor="factor" in rule_of,
            any_sampled=any_sampled,
            family=family,
        )


def _where_rule(rule: str, values: list[float], rule_of: list[str]) -> list[float]:
    """Each sequence's value where its strategy follows ``rule``, else 0 (the rule off)."""
    if rule not in rule_of:  # the usual step: no scan
        return [0.0] * len(values)
    return [v if r == rule else 0.0 for v, r in zip(values, rule_of)]


def _on_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays of one dtype as tensors on ``device``: views on the CPU
    (no copy, no op), one copy of them all to another device (a copy per
    array would cost a transfer each)."""
    if device.type == "cpu":
        return [torch.from_numpy(a) for a in arrays]
    sizes = [a.shape[0] for a in arrays]
    return list(torch.from_numpy(np.concatenate(arrays)).to(device, non_blocking=True).split(sizes))


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance as the reference does it:
    uncond + (scale + 1) * (cond - uncond). scale: (num_rows, 1)."""
    return uncond + (scale + 1) * (cond - uncond)


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits with every token outside each row's top-k / top-p nucleus set
    to -inf (the likeliest token is always kept). (rows, vocab)."""
    sorted_logits, order = logits.sort(dim=1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = sorted_logits.float().softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs
    keep &= mass_before < top_p[:, None]
    keep[:, 0] = True
    return logits.masked_fill(~keep.scatter(1, order, keep), float("-inf"))


def factor_quota(confidence: torch.Tensor, row_seq: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule as a per-sequence quota: the n most
    confident rows while the n-th (1-based) has confidence >= 1 - f / (n + 1),
    at least one. (num_seqs,) int64; sequences with f = 0 get 0."""
    num_seqs = factor.shape[0]
    order = torch.sort(confidence, descending=True, stable=True).indices
    order = order[torch.sort(row_seq[order], stable=True).indices]
    seq_sorted = row_seq[order]
    counts = torch.bincount(row_seq, minlength=num_seqs)
    rank = torch.arange(row_seq.shape[0], device=row_seq.device) - (torch.cumsum(counts, 0) - counts)[seq_sorted]
    passes = confidence[order] >= 1 - factor[seq_sorted] / (rank + 2)
    first_fail = torch.where(passes, counts[seq_sorted], rank)  # the rank of the first row that fails
    n = torch.full((num_seqs,), row_seq.shape[0], device=row_seq.device, dtype=torch.int64)
    n = n.scatter_reduce(0, seq_sorted, first_fail, reduce="amin")
    n = torch.minimum(n, counts).clamp(min=1)
    return torch.where(factor > 0, n, torch.zeros_like(n))


def denoise_step(logits: torch.Tensor, rows: StepRows,
                 vocab: VocabShard | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: (num_rows, vocab). Returns (x0, commit, prob): the predicted
    token of every row, int64 (num_rows,), which rows to commit now, bool
    (num_rows,), and the model's probability of each row's x0, float32
    (num_rows,) (what a client shows as the token's confidence, whatever the
    remasking strategy ranked by).

    With ``vocab`` (tensor parallelism), ``logits`` are this rank's
    vocabulary slice: the scores are reduced across the ranks from per-row
    statistics (``kernels.vocab_parallel``); steps with rows that need the
    whole distribution (top-k / top-p filters) gather their rows first.

    top-k / top-p restrict which token is sampled (rows with temperature > 0);
    the probability confidence stays the model's own probability of that
    token, while margin and entropy are those of the filtered distribution."""
    names = sorted(set(rows.remasking))
    needs = {"with_margin": any(REMASKING[n].needs_margin for n in names),
             "with_entropy": any(REMASKING[n].needs_entropy for n in names)}
    if vocab is not None and _filters(rows):
        logits, vocab = vocab.gather(logits), None
    unmask_scores = ops.unmask_scores if vocab is None else vocab.unmask_scores
    if rows.any_filter:
        filtered = (rows.temperature > 0) & ((rows.top_k > 0) | (rows.top_p < 1))
        idx = filtered.nonzero().squeeze(1)
        sampling_logits = logits.clone()
        sampling_logits[idx] = top_k_top_p_filter(logits[idx], rows.top_k[idx], rows.top_p[idx])
        scores = unmask_scores(sampling_logits, rows.temperature, rows.seed, rows.row_offset, **needs,
                               any_sampled=rows.any_sampled)
        log_probs = torch.log_softmax(logits[idx].float(), dim=1)
        scores["prob"][idx] = log_probs.gather(1, scores["x0"][idx, None]).squeeze(1).exp()
    else:
        scores = unmask_scores(logits, rows.temperature, rows.seed, rows.row_offset, **needs,
                               any_sampled=rows.any_sampled)
    fam = rows.family
    prob_exact = scores["prob"]  # what threshold rules compare (the sampling distribution's, unrounded, if so)
    if fam is not None and bool(fam.dist.any()):
        idx = fam.dist.nonzero().squeeze(1)
        if vocab is None:
            dist = sampling_scores(logits[idx], rows.temperature[idx], rows.top_k[idx], rows.top_p[idx],
                                   rows.seed[idx], rows.row_offset[idx], fam.top_p_first[idx])
        else:  # no filter touches these rows (else they were gathered above)
            dist = vocab.sampling_scores(logits[idx], rows.temperature[idx], rows.seed[idx], rows.row_offset[idx])
        prob_exact = prob_exact.to(dist["prob"].dtype)
        prob_exact[idx] = dist["prob"]
        for key in ("x0", "prob", "margin", "entropy"):
            if key in scores:
                scores[key][idx] = dist[key].to(scores[key].dtype)
    if any(REMASKING[n].needs_uniform for n in names) or (fam is not None and fam.any_alg_temp):
        scores["uniform"] = philox_uniform(rows.random_seed, rows.row_offset)
    if len(names) == 1:
        confidence = REMASKING[names[0]].confidence(scores)
    else:
        kind = torch.tensor([names.index(n) for n in rows.remasking], device=logits.device)[rows.row_seq]
        confidence = torch.empty_like(scores["prob"])
        for k, n in enumerate(names):
            confidence = torch.where(kind == k, REMASKING[n].confidence(scores).to(confidence.dtype), confidence)
    if fam is not None and fam.any_alg_temp:
        confidence = gumbel_rank(confidence, scores["uniform"], fam.alg_temp)
    confidence = confidence.float()
    quota = rows.quota
    if rows.any_factor:
        quota = torch.where(rows.factor > 0, factor_quota(confidence, rows.row_seq, rows.factor), quota)
    if fam is not None:  # LLaDA2: all above the threshold when at least the quota are, else the quota
        tau = fam.tq_threshold[rows.row_seq]
        high = ((prob_exact.double() > tau) & (tau > 0)).long()
        num_high = torch.zeros_like(quota).index_add_(0, rows.row_seq, high)
        quota = torch.where(fam.tq_threshold > 0, torch.maximum(quota, num_high), quota)
    commit = ops.select_commits(confidence, rows.row_seq, quota, rows.threshold)
    if fam is not None:  # Dream's origin: a coin per row
        p = fam.transfer_prob[rows.row_seq]
        commit = torch.where(p >= 0, scores.get("uniform", p) < p, commit)
    return scores["x0"], commit, scores["prob"].float()


def _filters(rows: StepRows) -> bool:
    """Whether a top-k / top-p filter touches some row: sampled rows that
    ask, and Dream's rows, which filter at T = 0 too."""
    if rows.any_filter:
        return True
    fam = rows.family
    return fam is not None and bool((fam.top_p_first & ((rows.top_k > 0) | (rows.top_p < 1))).any())


def edit_step(logits: torch.Tensor, rows: StepRows, current: torch.Tensor, editing_threshold: torch.Tensor,
              vocab: VocabShard | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA2.1's token editing over already decoded rows: a row is
    re-written with its x0 when x0 differs from its ``current`` token and
    its probability under the sampling distribution exceeds the row's
    ``editing_threshold``. logits: (num_rows, vocab); current (num_rows,)
    int64; editing_threshold (num_rows,) float64. Returns (x0, edit, prob).
    ``vocab``: as in ``denoise_step``."""
    if vocab is not None and rows.any_filter:
        logits, vocab = vocab.gather(logits), None
    if vocab is not None:
        s = vocab.sampling_scores(logits, rows.temperature, rows.seed, rows.row_offset)
    else:
        s = sampling_scores(logits, rows.temperature, rows.top_k, rows.top_p, rows.seed, rows.row_offset,
                            torch.zeros_like(rows.row_seq, dtype=torch.bool))
    edit = (s["prob"].double() > editing_threshold) & (s["x0"] != current)
    return s["x0"], edit, s["prob"].float()
