"""The unmask scores over a vocabulary split across tensor-parallel ranks,
without gathering rows x vocab logits.

Each rank holds the logits of its slice [start, end) of the vocabulary
(the vocabulary-parallel LM head's output). ``VocabShard.unmask_scores``
gives what ``kernels.reference.unmask_scores`` gives on the whole rows: each
rank reduces its slice to a few numbers per row (max, sum of exponentials,
the best sampling score and its token id, the logit there, its top two, an
entropy partial), one ``all_gather`` of those (num_rows x 8 per rank)
crosses the group, and every rank combines them in rank order, so every
rank reaches the same x0 and confidences. x0 is exactly the argmax the
whole row would give: the Gumbel noise of token v is drawn at the same
counter (``row_offset * vocab_size + v``) on whichever rank holds v, and ties
go to the lowest token id (the lowest rank, then the lowest local index),
as ``torch.argmax`` breaks them. The probabilities are the same up to the
rounding of a sum taken in another order.

``sampling_scores`` does the same for the families' sampling distribution
(two small all_gathers), ``target_log_probs`` for likelihood scores.
``gather`` is the fallback for what needs the whole distribution (top-k /
top-p filters, logprobs' top alternatives): it concatenates the slices of
only the rows given.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.reference import philox_uniform


def vocab_bounds(vocab_size: int, world: int) -> list[int]:
    """Rank r holds tokens [bounds[r], bounds[r + 1]): balanced, lower ranks first."""
    return [vocab_size * r // world for r in range(world + 1)]


class VocabShard:
    def __init__(self, rank: int, world: int, vocab_size: int, group: dist.ProcessGroup | None = None):
        self.rank, self.world, self.vocab_size, self.group = rank, world, vocab_size, group
        self.bounds = vocab_bounds(vocab_size, world)
        self.start, self.end = self.bounds[rank], self.bounds[rank + 1]

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, end - start) on every rank -> (rows, vocab_size) on every rank."""
        width = max(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        padded = logits.new_zeros(logits.shape[0], width)
        padded[:, : logits.shape[1]] = logits
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[:, : b - a] for p, a, b in zip(parts, self.bounds, self.bounds[1:])], dim=1)

    def unmask_scores(
        self,
        logits: torch.Tensor,  # (num_rows, end - start) this rank's slice
        temperature: torch.Tensor,  # (num_rows,) float32, 0 = greedy
        seed: torch.Tensor,  # (num_rows,) int64
        row_offset: torch.Tensor,  # (num_rows,) int64
        banned_ids: torch.Tensor | None = None,  # (num_banned,) global token ids never predicted
        with_margin: bool = False,
        with_entropy: bool = False,
        any_sampled: bool | None = None,  # some row has T > 0, known on the host; None = read from temperature
    ) -> dict[str, torch.Tensor]:
        """``kernels.reference.unmask_scores`` of the whole rows; see the module docstring."""
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        l = logits.to(work)  # (rows, width)
        rows, width = l.shape
        if banned_ids is not None and banned_ids.numel() > 0:
            local = banned_ids.to(l.device)
            local = local[(local >= self.start) & (local < self.end)] - self.start
            l = l.index_fill(1, local, float("-inf"))
        scores = l
        if any_sampled if any_sampled is not None else bool((temperature > 0).any()):
            idx = (temperature > 0).nonzero().squeeze(1)
            scores = l.clone()
            scores[idx] = l[idx] / temperature[idx].to(work)[:, None] + self._noise(seed[idx], row_offset[idx], work)
        m = l.max(dim=1).values
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        shifted = l - m_safe[:, None]
        e = shifted.exp()
        s = e.sum(dim=1)
        t = (e * torch.where(e > 0, shifted, torch.zeros_like(shifted))).sum(dim=1)
        best = scores.argmax(dim=1)
        top = l.topk(min(2, width), dim=1).values
        if top.shape[1] < 2:
            top = torch.cat([top, torch.full_like(top[:, :1], float("-inf"))], dim=1)
        stats = torch.stack([m, s, t, scores.gather(1, best[:, None]).squeeze(1), (best + self.start).to(work),
                             l.gather(1, best[:, None]).squeeze(1), top[:, 0], top[:, 1]], dim=1).double()
        g = self._all_rows(stats).to(work)  # (world, rows, 8)
        m_r, s_r, t_r = g[..., 0], g[..., 1], g[..., 2]
        big_m = m_r.max(dim=0).values
        m_ok = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
        w = torch.where(torch.isfinite(m_r), (m_r - m_ok).exp(), torch.zeros_like(m_r))
        total = (s_r * w).sum(dim=0)
        log_total = total.log()
        winner = g[..., 3].argmax(dim=0)  # the first rank holding the best score: lowest token id on ties
        pick = winner[None, :, None].expand(1, rows, g.shape[2])
        chosen = g.gather(0, pick).squeeze(0)  # (rows, 8) the winning rank's stats
        x0 = chosen[:, 4].to(torch.int64)
        out = {"x0": x0, "prob": (chosen[:, 5] - m_ok - log_total).exp().float()}
        if with_margin:
            cand = torch.cat([g[..., 6], g[..., 7]], dim=0).topk(2, dim=0).values  # (2, rows)
            out["margin"] = ((cand[0] - m_ok - log_total).exp() - (cand[1] - m_ok - log_total).exp()).float()
        if with_entropy:
            shifted_sum = (w * (t_r + torch.where(w > 0, m_r - m_ok, torch.zeros_like(m_r)) * s_r)).sum(dim=0)
            out["entropy"] = (log_total - shifted_sum / total).float()
        return out

    def sampling_scores(
        self,
        logits: torch.Tensor,  # (rows, end - start) this rank's slice
        temperature: torch.Tensor,  # (rows,) float32; 0 = greedy
        seed: torch.Tensor,  # (rows,) int64
        row_offset: torch.Tensor,  # (rows,) int64
    ) -> dict[str, torch.Tensor]:
        """``sampler.distribution.sampling_scores`` of whole rows that no
        top-k / top-p filter touches: the tempered distribution's
        log-normaliser from one all_gather of (max, sum of exponentials),
        then each rank's probabilities exactly as the whole row computes
        them (x - max - log(sum)), and a second all_gather of the best
        token, its probability, the top two and the entropy's share."""
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        l = logits.to(work)
        sampled = temperature > 0
        t = torch.where(sampled, temperature, torch.ones_like(temperature)).to(work)[:, None]
        scaled = l / t
        m = scaled.max(dim=1).values
        s = (scaled - m[:, None]).exp().sum(dim=1)
        g = self._all_rows(torch.stack([m, s], dim=1).double()).to(work)  # (world, rows, 2)
        big_m = g[..., 0].max(dim=0).values
        log_total = (g[..., 1] * (g[..., 0] - big_m).exp()).sum(dim=0).log()
        probs = ((scaled - big_m[:, None]) - log_total[:, None]).exp()
        best = probs.argmax(dim=1)
        best_val = probs.gather(1, best[:, None]).squeeze(1)
        if bool(sampled.any()):
            idx = sampled.nonzero().squeeze(1)
            noisy = scaled[idx] + self._noise(seed[idx], row_offset[idx], work)
            best[idx] = noisy.argmax(dim=1)
            best_val = best_val.clone()
            best_val[idx] = noisy.gather(1, best[idx, None]).squeeze(1)
        top = probs.topk(min(2, probs.shape[1]), dim=1).values
        if top.shape[1] < 2:
            top = torch.cat([top, torch.zeros_like(top[:, :1])], dim=1)
        entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=1)
        stats = torch.stack([best_val, (best + self.start).to(work), probs.gather(1, best[:, None]).squeeze(1),
                             top[:, 0], top[:, 1], entropy], dim=1).double()
        g = self._all_rows(stats).to(work)  # (world, rows, 6)
        winner = g[..., 0].argmax(dim=0)  # first rank holding the best: lowest token id on ties
        chosen = g.gather(0, winner[None, :, None].expand(1, g.shape[1], g.shape[2])).squeeze(0)
        cand = torch.cat([g[..., 3], g[..., 4]], dim=0).topk(2, dim=0).values
        return {"x0": chosen[:, 1].to(torch.int64), "prob": chosen[:, 2], "margin": cand[0] - cand[1],
                "entropy": g[..., 5].sum(dim=0)}

    def target_log_probs(self, logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """log_softmax(whole row)[target] per row, computed in ``dtype``:
        the log-normaliser from (max, sum of exponentials) of every slice,
        the target's logit from the rank that holds it. (rows,)"""
        l = logits.to(dtype)
        m = l.max(dim=1).values
        s = (l - m[:, None]).exp().sum(dim=1)
        mine = (targets >= self.start) & (targets < self.end)
        local = torch.where(mine, targets - self.start, 0)
        at = torch.where(mine, l.gather(1, local[:, None]).squeeze(1), torch.zeros_like(m))
        g = self._all_rows(torch.stack([m, s, at], dim=1).double()).to(dtype)  # (world, rows, 3)
        big_m = g[..., 0].max(dim=0).values
        log_total = (g[..., 1] * (g[..., 0] - big_m).exp()).sum(dim=0).log()
        return (g[..., 2].sum(dim=0) - big_m) - log_total

    def _noise(self, seed: torch.Tensor, row_offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The Gumbel noise of this rank's tokens, drawn at the counters the
        whole row draws them (``kernels.reference.gumbel_noise``)."""
        ids = torch.arange(self.start, self.end, dtype=torch.int64, device=seed.device)
        offset = row_offset.to(torch.int64)[:, None] * self.vocab_size + ids[None, :]
        u = philox_uniform(seed.to(torch.int64)[:, None], offset)
        return (-torch.log(-torch.log(u))).to(dtype)

    def _all_rows(self, stats: torch.Tensor) -> torch.Tensor:
        """(rows, k) per rank -> (world, rows, k) on every rank, in rank order."""
        parts = [torch.empty_like(stats) for _ in range(self.world)]
        dist.all_gather(parts, stats.contiguous(), group=self.group)
        return torch.stack(parts)
