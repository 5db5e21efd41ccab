"""The scheduler: which requests take a denoising step now. Pure Python, no
torch.

Continuous batching for diffusion: every running request takes one step of
its own schedule per engine step, whatever block or step it is at; waiting
requests are admitted first-come first-served while the batch has room
(``max_num_seqs`` requests, ``max_num_batched_tokens`` canvas tokens per
forward). A request's canvas length is fixed at admission, so the batch never
has to preempt anyone.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from server.engine.messages import RequestOutput, RunnerOutput, ScheduledSeq, SchedulerOutput
from server.engine.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # requests in one forward pass
    max_num_batched_tokens: int = 8192  # canvas tokens in one forward pass (cfg counts twice)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def check_fits(self, req: Request) -> None:
        """A request whose canvas exceeds the per-step budget could never be admitted."""
        limit = self.config.max_num_batched_tokens
        if req.num_tokens > limit:
            raise ValueError(f"max_tokens: the canvas ({req.num_tokens} tokens, guidance counted twice) "
                             f"exceeds max_num_batched_tokens {limit}")

    def add(self, req: Request) -> None:
        self.check_fits(req)
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
                    req.status, req.error = status, error
                    return req
        return None

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens - sum(r.num_tokens for r in self.running)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_tokens > budget:
                break  # first come, first served: no overtaking
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= req.num_tokens
            out.admitted.append(req.req_id)
        for req in self.running:
            req.skip_empty_steps()
            if req.is_done:
                continue
            seed, random_seed = req.seeds()
            p = req.params
            out.seqs.append(ScheduledSeq(
                req_id=req.req_id, canvas=req.canvas, prompt_len=req.prompt_len,
                rows=req.masked_positions(), quota=req.quota(), temperature=p.temperature,
                top_k=p.top_k, top_p=p.top_p,
                seed=seed, random_seed=random_seed, remasking=p.remasking, cfg_scale=p.cfg_scale,
            ))
        return out

    def update(self, result: RunnerOutput) -> list[RequestOutput]:
        """Applies a step's commits; finishes and frees the requests that are
        done. Returns one output per request that was stepped or finished."""
        outputs = []
        for req in list(self.running):
            committed = result.commits.get(req.req_id)
            new_ids: list[int] = []
            if committed is not None:
                new_ids = req.commit(*committed)
                if req.first_token_time is None and new_ids:
                    req.first_token_time = time.monotonic()
            if req.is_done:
                req.status = req.finish_status()
                self.running.remove(req)
            if committed is not None or req.status.is_finished:
                outputs.append(RequestOutput(
                    req_id=req.req_id, new_token_ids=new_ids, token_ids=req.output_ids,
                    finished=req.status.is_finished,
                    finish_reason=req.status.value if req.status.is_finished else None,
                    committed=committed))
        return outputs
