"""The model runner: the only place in the engine that builds tensors.

It packs the scheduled canvases into one ragged batch (sequences end to end,
``cu_seqlens``, no padding), runs the model with the last layer and the LM
head only on the rows (each sequence's masked positions in its current
block; the other tokens still give that layer their keys and values), applies
classifier-free guidance where asked, runs the sampler's denoising step and
returns plain lists.

What each sequence puts through the model depends on its decoding mode:
- exact: the whole canvas;
- a cache mode at its block's first step ("fill"): the whole canvas, storing
  the keys/values of the prefix (prefix_cache) or of prefix and suffix
  (dual_cache) packed into its pages;
- a cache mode later in the block ("use"): block + suffix (prefix_cache) or
  the block alone (dual_cache), attending to the stored keys as well.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sampler.block_diffusion import StepRows, apply_cfg, denoise_step, edit_step
from server.engine.buckets import bucket_for, static_width
from server.engine.graphs import Graph, StepGraphs
from server.engine.likelihood_batch import pack_scores, score
from server.engine.messages import RunnerOutput, ScheduledSeq, SchedulerOutput, TokenLogprob
from server.models.kv_cache import CacheView, PagedKVCache


@dataclass
class SeqPlan:
    """What one sequence computes this step."""

    start: int  # first canvas position computed
    end: int  # one past the last
    cached: int  # keys read from its pages
    stored: list[int]  # canvas positions whose keys/values it stores, in slot order
    first_slot: int = 0  # the slot of stored[0] in the request's pages


def as_long(values: list[int] | np.ndarray, device: torch.device) -> torch.Tensor:
    """Host ints as an int64 tensor on ``device``: numpy reads a list
    several times faster than ``torch.tensor`` does (host time per step)."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(values.astype(np.int64, copy=False))
    else:
        host = torch.from_numpy(np.fromiter(values, dtype=np.int64, count=len(values)))
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def host_array(t: torch.Tensor) -> np.ndarray:
    """A tensor's values in numpy (a view on the CPU, a copy from a device)."""
    return t.numpy() if t.is_cpu else t.cpu().numpy()


def flat_ints(lists: list[list[int]], total: int) -> np.ndarray:
    """The lists end to end, as one int64 array of ``total`` values."""
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)


# A sequence's sampler settings, in StepRows.build's order: one C-level pass over the batch per step.
_STEP_SETTINGS = operator.attrgetter("quota", "temperature", "seed", "random_seed", "remasking", "top_k", "top_p",
                                     "threshold", "factor", "schedule", "alg_temp", "transfer_prob")


def plan(s: ScheduledSeq) -> SeqPlan:
    length = len(s.canvas)
    b0, b1 = s.block
    if s.schedule == "llada2":
        # Block-causal over a grid from 0: nothing after the block is seen, and
        # a finished block's keys/values never change, so a fill computes only
        # what is not stored yet and stores each finished block once.
        # The block's grid start: a prompt tail in the block still sees its masks.
        g0 = b0 - b0 % s.block_length
        if s.cache_action is None:
            return SeqPlan(0, b1, 0, [])
        if s.cache_action == "fill":
            return SeqPlan(s.kv_len, b1, s.kv_len, list(range(s.kv_len, g0)), s.kv_len)
        return SeqPlan(g0, b1, g0, [])
    if s.cache_action is None:
        return SeqPlan(0, length, 0, [])
    dual = s.decoding == "dual_cache"
    if s.cache_action == "fill":
        stored = list(range(b0)) + (list(range(b1, length)) if dual else [])
        return SeqPlan(0, length, 0, stored)
    return SeqPlan(b0, b1 if dual else length, b0 + (length - b1 if dual else 0), [])


class ModelRunner:
    def __init__(self, model: torch.nn.Module, mask_id: int, num_kv_pages: int = 0, page_size: int = 16,
                 bucket_sizes: list[int] | None = None):
        """``bucket_sizes``: pad static use steps to these batch sizes
        (server/engine/buckets.py); None = every step ragged, as scheduled."""
        self.model = model
        self.bucket_sizes = bucket_sizes
        self.mask_id = mask_id
        self.device = model.device
        self.kv_cache = None
        if num_kv_pages:
            cfg = model.config
            self.kv_cache = PagedKVCache.allocate(cfg.n_layers, num_kv_pages, page_size, cfg.n_kv_heads,
                                                  cfg.head_dim, model.dtype, model.device)
        self.graphs: StepGraphs | None = None  # captured static steps (capture_graphs)
        # (num_packed, each sequence's pages, the block table) of the last cache step (_block_table)
        self._table: tuple[int, list[list[int]], torch.Tensor] | None = None

    def capture_graphs(self, widths: list[int], max_pages: int, new_graph: Callable[[], Graph]) -> StepGraphs:
        """Captures the static use steps of these widths at every bucket
        (server/engine/graphs.py); later static steps that fit replay them.
        ``max_pages``: the static block table's pages per sequence (a step
        with a longer sequence runs eagerly, padded)."""
        if self.bucket_sizes is None or self.kv_cache is None or not self.model.has_static_step:
            raise ValueError("graphs need batch buckets, a KV cache and a model with a static step")
        self.graphs = StepGraphs(self.model, self.kv_cache, self.bucket_sizes, widths, max_pages, new_graph)
        self.graphs.capture()
        return self.graphs

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        seqs = sched.seqs
        if not seqs and not sched.scores:
            return RunnerOutput()
        plans = [plan(s) for s in seqs]
        lens = [p.end - p.start for p in plans]
        width = None  # a static step's tokens per sequence, when it is padded to its bucket
        if self.bucket_sizes is not None and not sched.scores:
            width = static_width(seqs, lens)
        # Every sequence's canvas slice end to end; positions and the rows that get logits built in numpy
        # over the whole batch (no per-row Python: host time per step).
        cu_seqlens = [0, *itertools.accumulate(lens)]
        ids: list[int] = []
        for s, p in zip(seqs, plans):
            ids += s.canvas[p.start:p.end]
        seq_rows = [sorted(s.rows + s.edit_rows) if s.edit_rows else s.rows for s in seqs]  # each in canvas order
        row_counts = [len(r) for r in seq_rows]
        # Each packed token's canvas position, and each row's packed index - its canvas position. Array methods,
        # not numpy's module functions: those add microseconds of Python each; one sequence's are a range and a
        # plain int (host time at batch 1).
        if len(plans) == 1:
            row_shift = -plans[0].start
            positions: list[np.ndarray] = [np.arange(plans[0].start, plans[0].end, dtype=np.int64)]
        else:
            shift = np.array([c - p.start for c, p in zip(cu_seqlens, plans)], dtype=np.int64)
            row_shift = shift.repeat(row_counts)
            positions = [np.arange(cu_seqlens[-1], dtype=np.int64) - shift.repeat(lens)]
        flat_rows = flat_ints(seq_rows, sum(row_counts))  # every row's canvas position
        cond_rows = flat_rows + row_shift  # its packed index
        uncond_rows: list[int] = []  # the same rows in the unconditional canvas (cfg only)
        num_pad = 0
        if width is not None:  # padding sequences: blocks of masks that attend only to themselves
            num_pad = bucket_for(len(seqs), self.bucket_sizes) - len(seqs)
            real_rows = cond_rows
            cond_rows = np.arange(cu_seqlens[-1] + num_pad * width)  # the LM head on every token: static
            ids += [self.mask_id] * (num_pad * width)
            positions += [np.arange(width)] * num_pad
            cu_seqlens += [cu_seqlens[-1] + width * (i + 1) for i in range(num_pad)]
        for s in seqs:  # unconditional canvases after all conditional ones (exact mode only)
            if s.cfg_scale > 0:
                start = cu_seqlens[-1]
                ids += [self.mask_id] * s.prompt_len + s.canvas[s.prompt_len:]
                positions.append(np.arange(len(s.canvas)))
                cu_seqlens.append(start + len(s.canvas))
                uncond_rows += [start + p for p in s.rows]

        # Rows per packed sequence (conditional canvases, then unconditional
        # ones), ascending: the last layer computes only these rows.
        row_counts += [len(s.rows) for s in seqs if s.cfg_scale > 0]
        if width is not None:
            row_counts = [width] * (len(seqs) + num_pad)
        score_rows: list[int] = []
        pack = None
        if sched.scores:  # likelihood samples' canvases go last
            pack = pack_scores(sched.scores, self.mask_id)
            start = cu_seqlens[-1]
            ids += pack.ids
            positions.append(np.asarray(pack.positions, dtype=np.int64))
            cu_seqlens += [start + n for n in itertools.accumulate(pack.seqlens)]
            score_rows = [start + r for r in pack.rows]
            row_counts += pack.row_counts
        rows_cu = [0, *itertools.accumulate(row_counts)]
        dev = self.device
        flat_positions = np.concatenate(positions) if len(positions) > 1 else positions[0]
        extra_rows = uncond_rows + score_rows
        if width is not None and self.graphs is not None \
                and self.graphs.fits(len(seqs) + num_pad, width, max(len(s.pages) for s in seqs)):
            # (bucket * width, vocab): the captured step, replayed on this step's inputs
            logits = self.graphs.run(len(seqs) + num_pad, width, ids, flat_positions, [p.cached for p in plans],
                                     [s.pages for s in seqs])
        else:
            logits = self.model(  # (len(cond_rows) + len(uncond_rows) + len(score_rows), vocab)
                as_long(ids, dev),
                as_long(flat_positions, dev),
                cu_seqlens,
                as_long(np.concatenate([cond_rows, extra_rows]) if extra_rows else cond_rows, dev),
                self._cache_view(seqs, plans, cu_seqlens),
                logits_cu_seqlens=rows_cu,
                **self._causal_blocks(seqs, len(cu_seqlens) - 1),
            )
        if width is not None:  # the real sequences' rows; padding's logits are dropped
            logits = logits.index_select(0, as_long(real_rows, dev))
        out = RunnerOutput()
        # Tensor parallel: logits are this rank's vocabulary slice. A plain attribute, read from the instance's
        # dict: nn.Module's __getattr__ on a miss costs microseconds (host time per step).
        vocab = vars(self.model).get("vocab_shard")
        if pack is not None:
            out.scores = score(pack, logits[len(cond_rows) + len(uncond_rows):], vocab)
            logits = logits[:len(cond_rows) + len(uncond_rows)]
        if not seqs:
            return out
        if uncond_rows:
            logits = self._guide(logits[: len(cond_rows)], logits[len(cond_rows):], seqs)
        row_logits = logits  # every row, each sequence's in canvas order: logprobs read them
        edits: dict[str, list[tuple[int, int, float]]] = {}
        if any(s.edit_rows for s in seqs):
            logits, edits = self._edit(logits, seqs, vocab)

        quotas, temperatures, seeds, random_seeds, remasking, top_ks, top_ps, thresholds, factors, schedules, \
            alg_temps, transfer_probs = map(list, zip(*map(_STEP_SETTINGS, seqs)))
        rows = StepRows.build(
            row_offsets=[[p - s.prompt_len for p in s.rows] for s in seqs], quotas=quotas, temperatures=temperatures,
            seeds=seeds, random_seeds=random_seeds, remasking=remasking, device=dev, top_ks=top_ks, top_ps=top_ps,
            thresholds=thresholds, factors=factors, schedules=schedules, alg_temps=alg_temps,
            transfer_probs=transfer_probs,
        )
        x0, commit, prob = denoise_step(logits, rows, vocab)
        if edits:
            self._commits_with_edits(seqs, x0.tolist(), commit.tolist(), prob.tolist(), edits, out)
        else:
            self._commits(seqs, flat_rows if logits is row_logits else None, x0, commit, prob, out)
        if any(s.num_logprobs is not None for s in seqs):
            out.logprobs = self._logprobs(row_logits, seqs, out.commits, vocab)
        return out

    @staticmethod
    def _commits(seqs: list[ScheduledSeq], flat_rows: np.ndarray | None, x0: torch.Tensor, commit: torch.Tensor,
                 prob: torch.Tensor, out: RunnerOutput) -> None:
        """Each sequence's committed positions, tokens and confidences into
        ``out`` (an entry for every sequence, empty if it committed nothing).
        Rows are each sequence's masked positions, ascending: a sequence's
        commits come out in canvas order. ``flat_rows``: every sequence's
        rows end to end, when the caller has them. The step's three vectors
        come to the host whole; only the committed rows become Python objects."""
        picked = host_array(commit).nonzero()[0]  # (num_committed,) ascending row indices
        tokens, probs = host_array(x0)[picked].tolist(), host_array(prob)[picked].tolist()
        counts = [len(s.rows) for s in seqs]
        if flat_rows is None:
            flat_rows = flat_ints([s.rows for s in seqs], sum(counts))
        positions = flat_rows[picked].tolist()
        if len(seqs) == 1:  # all of them (a searchsorted costs microseconds: host time at batch 1)
            cuts = [len(positions)]
        else:
            cuts = picked.searchsorted(list(itertools.accumulate(counts))).tolist()  # seq -> end of its commits
        j = 0
        for s, k in zip(seqs, cuts):
            out.commits[s.req_id] = (positions[j:k], tokens[j:k])
            out.confidences[s.req_id] = probs[j:k]
            j = k

    @staticmethod
    def _commits_with_edits(seqs: list[ScheduledSeq], x0: list[int], commit: list[bool], prob: list[float],
                            edits: dict[str, list[tuple[int, int, float]]], out: RunnerOutput) -> None:
        """``_commits`` when some sequence re-writes decoded tokens (LLaDA2.1):
        its commits and edits merged in canvas order."""
        i = 0
        pick = itertools.compress
        for s in seqs:
            n = len(s.rows)
            mine = commit[i:i + n]
            edited = edits.get(s.req_id)
            if edited is None:  # rows ascend (the block's masked positions): already in canvas order
                out.commits[s.req_id] = (list(pick(s.rows, mine)), list(pick(x0[i:i + n], mine)))
                out.confidences[s.req_id] = list(pick(prob[i:i + n], mine))
            else:
                picked = sorted([*zip(pick(s.rows, mine), pick(x0[i:i + n], mine), pick(prob[i:i + n], mine)),
                                 *edited])
                out.commits[s.req_id] = ([p for p, _, _ in picked], [t for _, t, _ in picked])
                out.confidences[s.req_id] = [c for _, _, c in picked]
            i += n

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[ScheduledSeq], commits: dict[str, tuple[list[int], list[int]]],
                  vocab=None) -> dict[str, list[TokenLogprob]]:
        """The committed tokens' logprobs and top alternatives, for the
        sequences that ask: log-softmax over only their committed rows.
        logits: (rows + edit rows, vocab), each sequence's in canvas order;
        with ``vocab`` (tensor parallel) this rank's vocabulary slice, and
        only those committed rows are gathered whole."""
        rows, tokens, owners = [], [], []
        i = 0
        for s in seqs:
            order = sorted(s.rows + s.edit_rows)
            if s.num_logprobs is not None:
                index = {pos: j for j, pos in enumerate(order)}
                positions, toks = commits[s.req_id]
                rows += [i + index[p] for p in positions]
                tokens += toks
                owners.append((s, len(positions)))
            i += len(order)
        if not rows:
            return {s.req_id: [] for s, _ in owners}
        dev = logits.device
        picked = logits[torch.tensor(rows, device=dev)]
        if vocab is not None:
            picked = vocab.gather(picked)
        lp = torch.log_softmax(picked.float(), dim=-1)  # (num_committed, vocab)
        chosen = lp.gather(1, torch.tensor(tokens, device=dev)[:, None]).squeeze(1).tolist()
        k = max(s.num_logprobs for s, _ in owners)
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        out: dict[str, list[TokenLogprob]] = {}
        j = 0
        for s, n in owners:
            k = s.num_logprobs
            out[s.req_id] = [TokenLogprob(chosen[r], list(zip(top_ids[r][:k], top_vals[r][:k])))
                             for r in range(j, j + n)]
            j += n
        return out

    def _causal_blocks(self, seqs: list[ScheduledSeq], num_packed: int) -> dict:
        """Block-causal models attend over each request's own block grid."""
        if not getattr(self.model.config, "block_causal_size", 0) or not any(s.block_length for s in seqs):
            return {}
        default = self.model.config.block_causal_size
        return {"causal_blocks": [s.block_length or default for s in seqs] + [default] * (num_packed - len(seqs))}

    def _edit(self, logits: torch.Tensor, seqs: list[ScheduledSeq], vocab=None):
        """Splits the edit rows (LLaDA2.1) from the masked rows and decides
        the edits. logits: (rows + edit rows, vocab), each sequence's in
        canvas order. Returns (the masked rows' logits, req_id -> [(position,
        token, prob)] of its edits)."""
        keep, edit_idx, offsets, current, tau, per_seq = [], [], [], [], [], []
        i = 0
        for k, s in enumerate(seqs):
            edit_set = set(s.edit_rows)
            for j, pos in enumerate(sorted(s.rows + s.edit_rows)):
                if pos in edit_set:
                    edit_idx.append(i + j)
                    offsets.append(pos - s.prompt_len)
                    current.append(s.canvas[pos])
                    tau.append(s.editing_threshold)
                    per_seq.append(k)
                else:
                    keep.append(i + j)
            i += len(s.rows) + len(s.edit_rows)
        dev = logits.device
        rows = StepRows.build(
            row_offsets=[[o for o, q in zip(offsets, per_seq) if q == k] for k in range(len(seqs))],
            quotas=[0] * len(seqs), temperatures=[s.temperature for s in seqs], seeds=[s.seed for s in seqs],
            random_seeds=[s.random_seed for s in seqs], remasking=[s.remasking for s in seqs], device=dev,
            top_ks=[s.top_k for s in seqs], top_ps=[s.top_p for s in seqs])
        x0, edit, prob = edit_step(logits[torch.tensor(edit_idx, device=dev)], rows,
                                   torch.tensor(current, dtype=torch.long, device=dev),
                                   torch.tensor(tau, dtype=torch.float64, device=dev), vocab)
        edits: dict[str, list[tuple[int, int, float]]] = {}
        for n, (k, ok) in enumerate(zip(per_seq, edit.tolist())):
            if ok:
                s = seqs[k]
                edits.setdefault(s.req_id, []).append((s.prompt_len + offsets[n], int(x0[n]), float(prob[n])))
        return logits[torch.tensor(keep, dtype=torch.long, device=dev)], edits

    def _cache_view(self, seqs: list[ScheduledSeq], plans: list[SeqPlan], cu_seqlens: list[int]) -> CacheView | None:
        if not any(s.cache_action for s in seqs):
            return None
        page_size = self.kv_cache.page_size
        num_packed = len(cu_seqlens) - 1  # unconditional canvases (cfg) follow seqs and use no cache
        cached = [p.cached for p in plans] + [0] * (num_packed - len(seqs))
        dev = self.device
        slots = None  # a step of use steps only stores nothing
        if any(p.stored for p in plans):
            slots = np.full(cu_seqlens[-1], -1, dtype=np.int64)
            for s, p, start in zip(seqs, plans, cu_seqlens):
                if p.stored:
                    j = np.arange(p.first_slot, p.first_slot + len(p.stored))  # slot j of the request's pages
                    slots[start - p.start + np.asarray(p.stored)] = \
                        np.asarray(s.pages)[j // page_size] * page_size + j % page_size
            slots = torch.from_numpy(slots).to(dev)
        return CacheView(self.kv_cache, self._block_table(seqs, num_packed), cached, slots)

    def _block_table(self, seqs: list[ScheduledSeq], num_packed: int) -> torch.Tensor:
        """(num_packed, max_pages) int32 on the device: each sequence's pages, page 0 past them (padding, cfg
        rows and shorter tables: never read). A request's pages are fixed from admission to its end, so the
        last step's table is kept while the batch's pages are the same (host time per step: a steady batch
        builds none); they are compared by value."""
        pages = [s.pages for s in seqs]
        if self._table is not None and self._table[0] == num_packed and self._table[1] == pages:
            return self._table[2]
        num_pages = [len(p) for p in pages] + [0] * (num_packed - len(seqs))
        max_pages = max(num_pages) or 1
        flat = flat_ints(pages, sum(num_pages))  # every sequence's pages end to end
        if num_pages[-1] == max_pages and num_pages.count(max_pages) == num_packed:  # equal canvases: one reshape
            table = flat.astype(np.int32).reshape(num_packed, max_pages)
        else:
            table = np.zeros((num_packed, max_pages), dtype=np.int32)
            table[np.arange(max_pages) < np.array(num_pages)[:, None]] = flat  # each row's first pages, row-major
        table_t = torch.from_numpy(table).to(self.device)
        self._table = (num_packed, [list(p) for p in pages], table_t)
        return table_t

    def _guide(self, cond: torch.Tensor, uncond: torch.Tensor, seqs) -> torch.Tensor:
        """Replaces the rows of guided sequences by their cfg combination.
        cond: (num_rows, vocab); uncond: (num_guided, vocab), the guided rows in order."""
        scale, guided, i = [], [], 0
        for s in seqs:
            n = len(s.rows)
            if s.cfg_scale > 0:
                guided += range(i, i + n)
                scale += [s.cfg_scale] * n
            i += n
        idx = torch.tensor(guided, dtype=torch.long, device=cond.device)  # (num_guided,) rows of cond
        s_t = torch.tensor(scale, dtype=cond.dtype, device=cond.device)[:, None]  # (num_guided, 1)
        out = cond.clone()
        out[idx] = apply_cfg(cond[idx], uncond, s_t)
        return out
