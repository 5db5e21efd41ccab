"""The scheduler: which requests take a denoising step now. Pure Python, no
torch.

Continuous batching for diffusion: every running request takes one step of
its own schedule per engine step, whatever block or step it is at; waiting
requests are admitted first-come first-served while the batch has room
(``max_num_seqs`` requests, KV pages for the whole canvas in the cache
modes). A request's canvas length is fixed at admission, so the batch never
has to preempt anyone.

An exception raised by one request's own state while it is scheduled or
updated fails that request alone (``SchedulerOutput.failed``, an "error"
output); every other request's step goes on.

The budget, ``max_num_batched_tokens``, bounds the tokens a step puts
through the model: the whole canvas for an exact step or a cache fill (cfg
counts the unconditional canvas too), the block (+ suffix for prefix_cache)
for a cache use step. Every step stays within it; how, and why it cannot
starve anyone, is said at ``Scheduler.schedule``.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from server.engine.likelihood import LikelihoodRequest, owner_of
from server.engine.messages import RequestOutput, RunnerOutput, ScheduledSeq, SchedulerOutput
from server.engine.pages import PageAllocator
from server.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # requests in one forward pass
    max_num_batched_tokens: int = 8192  # tokens one step puts through the model (see the module docstring)
    kv_cache_tokens: int | None = None  # KV slots for the cache modes; None = max_num_batched_tokens, 0 = off
    page_size: int = 16  # tokens per KV page

    @property
    def num_kv_pages(self) -> int:
        tokens = self.max_num_batched_tokens if self.kv_cache_tokens is None else self.kv_cache_tokens
        # Every request rounds up to whole pages: one spare page per slot of the batch.
        return 0 if tokens == 0 else -(-tokens // self.page_size) + self.max_num_seqs

    def __post_init__(self) -> None:
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 0:
            raise ValueError(f"kv_cache_tokens must be >= 0, got {self.kv_cache_tokens}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


def use_tokens(req: Request | LikelihoodRequest) -> int:
    """The most tokens a step of ``req`` that is not a cache fill computes
    from now on (a likelihood request's steps only shrink: its next is it)."""
    return req.num_tokens if isinstance(req, LikelihoodRequest) else req.max_use_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pages = PageAllocator(config.num_kv_pages, config.page_size) if config.num_kv_pages else None
        self.num_steps = 0  # schedule() calls so far: dates deferred fills

    def _release(self, req: Request) -> None:
        if req.pages:
            self.pages.free(req.pages)
            req.pages = []

    def add(self, req: Request | LikelihoodRequest) -> None:
        """Queues a request the engine validated (``ModelFacts``): one that can be admitted."""
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
              error: str | None = None) -> Request | None:
        """Removes a request wherever it is; returns it, or None if unknown."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.req_id == req_id:
                    queue.remove(req)
                    self._release(req)
                    req.status, req.error = status, error
                    return req
        return None

    def _admits(self, req: Request | LikelihoodRequest, use_sum: int, max_extra: int) -> bool:
        """Whether ``req`` may join running requests whose use steps sum to
        ``use_sum`` tokens and whose largest fill exceeds its use step by
        ``max_extra``: the invariant ``schedule`` relies on."""
        extra = max(max_extra, req.num_tokens - use_tokens(req))
        return use_sum + use_tokens(req) + extra <= self.config.max_num_batched_tokens

    def schedule(self) -> SchedulerOutput:
        """Admits what fits, then picks the running requests that step now.

        Why no step exceeds the budget, and no request starves. A cache fill
        costs a whole canvas, a use step only a block (+ suffix), and the
        fills of several requests may fall on the same engine step. Admitting
        against every request's fill at once (the sum of canvases) would give
        the cache modes back the exact mode's batch; instead admission keeps

            sum(max use step of every running request) + max(fill - max use step) <= budget,

        and a step whose pending fills do not all fit defers some of them by
        one engine step (a deferred request keeps its state: its output, noise
        included, depends only on its own steps, never on when they run).
        Use steps (exact steps are use steps whose fill equals them) always
        run: by the invariant they leave room for at least the first pending
        fill, so the fill that has waited longest always runs, and a deferred
        request waits at most as many engine steps as there are fills ahead
        of it (fewer than ``max_num_seqs``).
        """
        out = SchedulerOutput()
        self.num_steps += 1
        if self.waiting and len(self.running) < self.config.max_num_seqs:  # sums over the batch: only to admit
            use_sum = sum(use_tokens(r) for r in self.running)
            max_extra = max((r.num_tokens - use_tokens(r) for r in self.running), default=0)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            try:
                if not self._admits(req, use_sum, max_extra):
                    break  # first come, first served: no overtaking
                if req.uses_cache:
                    if not self.pages.can_allocate(len(req.canvas)):
                        break
                    req.pages = self.pages.allocate(len(req.canvas))
            except Exception as e:  # noqa: BLE001 - its own state: it fails alone
                self._drop(req.req_id, e, out)
                continue
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            use_sum += use_tokens(req)
            max_extra = max(max_extra, req.num_tokens - use_tokens(req))
            out.admitted.append(req.req_id)

        stepping: list[Request] = []
        fills: list[Request] = []
        budget = self.config.max_num_batched_tokens
        for owner in list(self.running):
            req = owner
            try:
                if isinstance(req, LikelihoodRequest):  # a chunk of samples, and its greedy check's step
                    chunk = req.next_chunk()
                    if chunk is not None:
                        out.scores.append(chunk)
                        budget -= len(chunk.sample_ids) * req.canvas_tokens  # runs every step, as use steps do
                    if req.greedy is None:
                        continue
                    req = req.greedy
                req.skip_empty_steps()
                if req.is_done:
                    continue
                if req.cache_action() == "fill":
                    fills.append(req)
                else:
                    cost = req.step_tokens()
                    stepping.append(req)
                    budget -= cost
            except Exception as e:  # noqa: BLE001 - its own state: it fails alone
                self._drop(owner.req_id, e, out)
        # Longest-deferred first (a stable sort keeps admission order among equals).
        fills.sort(key=lambda r: self.num_steps if r.deferred_since is None else r.deferred_since)
        for req in fills:
            try:
                cost = req.step_tokens()
            except Exception as e:  # noqa: BLE001
                self._drop(req.req_id, e, out)
                continue
            if cost <= budget:
                budget -= cost
                req.deferred_since = None
                stepping.append(req)
            elif req.deferred_since is None:
                req.deferred_since = self.num_steps
        for req in stepping:
            try:
                out.seqs.append(self._scheduled(req))
            except Exception as e:  # noqa: BLE001
                self._drop(req.req_id, e, out)
        return out

    def _drop(self, req_id: str, error: Exception, out: SchedulerOutput) -> None:
        """Fails a request whose own state broke scheduling (the one a
        greedy check belongs to), with whatever of it was already planned;
        everyone else's step goes on."""
        req_id = owner_of(req_id)
        req = self.abort(req_id, RequestStatus.FINISHED_ERROR, f"{type(error).__name__}: {error}")
        out.scores = [s for s in out.scores if s.req_id != req_id]
        out.seqs = [s for s in out.seqs if owner_of(s.req_id) != req_id]
        out.failed[req_id] = req.error if req is not None else str(error)

    @staticmethod
    def _scheduled(req: Request) -> ScheduledSeq:
        """The request's ScheduledSeq for this step. One object per request,
        built at its first step with the settings that never change; later
        steps refresh only the per-step fields (a persistent batch entry,
        as in vLLM's InputBatch: a request's settings are not reshaped every step)."""
        seed, random_seed = req.seeds()
        s = req.scheduled
        if s is None:
            p = req.params
            s = req.scheduled = ScheduledSeq(
                req_id=req.req_id, canvas=req.canvas, prompt_len=req.prompt_len,
                rows=req.masked_positions(), quota=req.quota(), temperature=p.temperature,
                top_k=p.top_k, top_p=p.top_p,
                seed=seed, random_seed=random_seed, remasking=p.remasking, cfg_scale=p.cfg_scale,
                threshold=p.threshold, factor=p.factor, block=req.block_range, decoding=p.decoding,
                cache_action=req.cache_action(), pages=req.pages, schedule=p.schedule,
                block_length=p.block_length, kv_len=req.kv_len, edit_rows=req.edit_positions(),
                editing_threshold=p.editing_threshold or 0.0, transfer_prob=req.transfer_prob(),
                alg_temp=p.alg_temp, num_logprobs=p.logprobs,
            )
            return s
        s.rows, s.quota, s.seed, s.random_seed = req.masked_positions(), req.quota(), seed, random_seed
        s.block, s.cache_action, s.kv_len = req.block_range, req.cache_action(), req.kv_len
        if req.editing:
            s.edit_rows = req.edit_positions()
        if req.timesteps:
            s.transfer_prob = req.transfer_prob()
        return s

    def update(self, result: RunnerOutput) -> list[RequestOutput]:
        """Applies a step's commits; finishes and frees the requests that are
        done. Returns one output per request that was stepped or finished."""
        outputs = []
        for req in list(self.running):
            try:
                out = self._update_one(req, result)
            except Exception as e:  # noqa: BLE001 - its own state: it fails alone
                error = f"{type(e).__name__}: {e}"
                if self.abort(req.req_id, RequestStatus.FINISHED_ERROR, error) is None:  # already out of the batch
                    self._release(req)
                    req.status, req.error = RequestStatus.FINISHED_ERROR, error
                out = RequestOutput(req.req_id, [], [], True, RequestStatus.FINISHED_ERROR.value, error)
            if out is not None:
                outputs.append(out)
        return outputs

    def _update_one(self, req: Request | LikelihoodRequest, result: RunnerOutput) -> RequestOutput | None:
        """One request's part of ``update``: its output, if it stepped or finished."""
        if isinstance(req, LikelihoodRequest):
            greedy_id = req.greedy.req_id if req.greedy is not None else None
            req.record(result.scores.get(req.req_id), result.commits.get(greedy_id))
            if not req.is_done:
                return None
            req.status = req.finish_status()
            self.running.remove(req)
            return RequestOutput(req.req_id, [], [], True, req.status.value, num_steps=req.num_forward_steps,
                                 likelihood=req.result())
        committed = result.commits.get(req.req_id)
        new_ids: list[int] = []
        if committed is not None:
            new_ids = req.commit(*committed, result.logprobs.get(req.req_id) if result.logprobs else None)
            if new_ids and req.first_token_time is None:
                req.first_token_time = time.monotonic()
        if req.is_done:
            req.status = req.finish_status()
            self.running.remove(req)
            self._release(req)
        finished = req.status.is_finished
        if committed is None and not finished:
            return None
        return RequestOutput(
            req_id=req.req_id, new_token_ids=new_ids, token_ids=req.output_ids, finished=finished,
            finish_reason=req.status.value if finished else None, committed=committed,
            confidences=result.confidences.get(req.req_id), num_steps=req.num_forward_steps,
            logprobs=req.output_logprobs)
