"""Likelihood samples in the runner's forward pass: the masked canvases of
the step's scheduled samples, packed after the generation canvases, and
their losses from the logits of the masked rows.

Each sample is one canvas (context + continuation, some continuation tokens
replaced by the mask id, as ``sampler.likelihood.draw_masks`` says); only
its masked rows get logits. With guidance, each sample also has its
unconditional canvas (the context masked out), packed after all the
conditional ones, its rows in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sampler.block_diffusion import apply_cfg
from sampler.likelihood import draw_masks, sample_losses
from server.engine.messages import ScheduledScore


@dataclass
class ScorePack:
    """The step's likelihood canvases, ready to append to the packed batch."""

    ids: list[int]  # the canvases' tokens, end to end
    positions: list[int]  # each token's position in its canvas
    seqlens: list[int]  # packed sequence -> length (conditional canvases, then unconditional ones)
    rows: list[int]  # packed index (from the first canvas) of every row that gets logits, per sequence ascending
    row_counts: list[int]  # packed sequence -> its rows
    num_cond_rows: int  # rows of the conditional canvases (the first of ``rows``)
    targets: torch.Tensor  # (num_cond_rows,) int64 the true token of each conditional row
    row_sample: torch.Tensor  # (num_cond_rows,) int64 row -> sample (over the whole step, in schedule order)
    p_mask: torch.Tensor  # (num_cond_rows,) float32 the row's sample's masked fraction x / T
    guided_rows: torch.Tensor  # (num_uncond_rows,) int64 the conditional row each unconditional row guides
    guided_scale: torch.Tensor  # (num_uncond_rows, 1) the cfg scale of each
    num_samples: list[int]  # score -> samples scored
    req_ids: list[str]  # score -> req_id


def pack_scores(scores: list[ScheduledScore], mask_id: int) -> ScorePack:
    ids: list[int] = []
    positions: list[int] = []
    seqlens: list[int] = []
    rows: list[int] = []
    row_counts: list[int] = []
    targets, row_sample, p_mask = [], [], []
    # guided scores' unconditional canvases, their rows (as the conditional ones), row counts, cond rows, scale
    uncond: list[tuple[torch.Tensor, list[int], list[int], torch.Tensor, float]] = []
    num_samples_before = 0
    for s in scores:
        seq = torch.tensor(s.seq_ids, dtype=torch.int64)
        length, ctx = len(s.seq_ids), s.context_len
        num_targets = length - ctx
        is_mask, num_masked = draw_masks(s.seed, num_targets, s.batch_size, s.sample_ids)  # (n, T), (n,)
        n = len(s.sample_ids)
        canvas = seq.repeat(n, 1)  # (n, length)
        canvas[:, ctx:][is_mask] = mask_id
        sample, t = is_mask.nonzero(as_tuple=True)  # row-major: by sample, positions ascending
        local = (sample * length + ctx + t).tolist()  # packed index within these canvases
        first_row = len(rows)
        base = len(ids)
        rows += [base + i for i in local]
        ids += canvas.flatten().tolist()
        positions += list(range(length)) * n
        seqlens += [length] * n
        row_counts += num_masked.tolist()
        targets.append(seq[ctx + t])
        row_sample.append(sample + num_samples_before)
        p_mask.append((num_masked / num_targets)[sample].to(torch.float32))
        if s.cfg_scale > 0:
            un = canvas.clone()
            un[:, :ctx] = mask_id
            uncond.append((un, local, num_masked.tolist(), torch.arange(first_row, len(rows)), s.cfg_scale))
        num_samples_before += n
    num_cond_rows = len(rows)
    guided_rows, guided_scale = [], []
    for un, local, counts, cond_rows, scale in uncond:
        n, length = un.shape
        base = len(ids)
        rows += [base + i for i in local]
        ids += un.flatten().tolist()
        positions += list(range(length)) * n
        seqlens += [length] * n
        row_counts += counts
        guided_rows.append(cond_rows)
        guided_scale += [scale] * len(cond_rows)
    return ScorePack(
        ids=ids, positions=positions, seqlens=seqlens, rows=rows, row_counts=row_counts, num_cond_rows=num_cond_rows,
        targets=torch.cat(targets), row_sample=torch.cat(row_sample), p_mask=torch.cat(p_mask),
        guided_rows=torch.cat(guided_rows) if guided_rows else torch.zeros(0, dtype=torch.int64),
        guided_scale=torch.tensor(guided_scale, dtype=torch.float64)[:, None],
        num_samples=[len(s.sample_ids) for s in scores], req_ids=[s.req_id for s in scores],
    )


def score(pack: ScorePack, logits: torch.Tensor, vocab=None) -> dict[str, list[float]]:
    """req_id -> each scored sample's loss L, in schedule order.
    logits: (len(pack.rows), vocab), in the order of ``pack.rows`` (with
    ``vocab``, tensor parallel: this rank's vocabulary slice)."""
    dev = logits.device
    cond = logits[:pack.num_cond_rows]
    if pack.guided_rows.numel():
        idx = pack.guided_rows.to(dev)
        cond = cond.clone()
        cond[idx] = apply_cfg(cond[idx], logits[pack.num_cond_rows:], pack.guided_scale.to(dev, cond.dtype))
    losses = sample_losses(cond, pack.targets.to(dev), pack.row_sample.to(dev), pack.p_mask,
                           sum(pack.num_samples), vocab).tolist()
    out, start = {}, 0
    for req_id, n in zip(pack.req_ids, pack.num_samples):
        out[req_id] = losses[start:start + n]
        start += n
    return out
