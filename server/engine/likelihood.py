"""A likelihood request's state, torch-free: which Monte Carlo samples are
still to score, their losses, and its greedy check.

A likelihood request (``/v1/loglikelihood``) is a few forward passes of
fixed canvases, no commits: per engine step it hands the runner a chunk of
its samples (as many as its token share allows, at most one Monte Carlo
batch), and the step's forward pass scores them beside the generation
requests' canvases. Which positions a sample masks depends only on the
request's seed and the sample's index, so chunking changes nothing.

The greedy check is eval_llada.py's ``suffix_greedy_prediction``: starting
from the context followed by T masks, commit at each of T steps the single
most confident argmax prediction, and say whether the result is the
continuation. That is exactly a generation with gen_length = steps =
block_length = T, temperature 0, ``low_confidence`` remasking (and the same
cfg_scale), so it runs as one: a generation request without stop tokens,
stepped in the same batch. It ends early, as False, at the first committed
token that differs from the continuation (committed tokens never change).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sampler.params import DiffusionParams, LikelihoodParams
from server.engine.messages import LikelihoodResult, ScheduledScore
from server.engine.request import Request, RequestStatus

GREEDY_SUFFIX = "/greedy"  # the greedy check's req_id is its owner's plus this


def owner_of(req_id: str) -> str:
    """The request a scheduled req_id belongs to (a greedy check's owner)."""
    return req_id[:-len(GREEDY_SUFFIX)] if req_id.endswith(GREEDY_SUFFIX) else req_id


@dataclass
class LikelihoodRequest:
    req_id: str
    context_ids: list[int]
    continuation_ids: list[int]
    params: LikelihoodParams
    mask_id: int
    max_tokens_per_step: int  # the scheduler's max_num_batched_tokens: sizes the chunks
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None

    def __post_init__(self) -> None:
        p = self.params
        self.seq_ids = list(self.context_ids) + list(self.continuation_ids)
        self.losses: list[float] = []  # L of samples 0, 1, ... (scored in order)
        self.num_scheduled = 0  # samples handed to the runner so far
        self.is_greedy: bool | None = None
        self.greedy: Request | None = None
        if p.check_greedy:
            n = len(self.continuation_ids)
            self.greedy = Request(self.req_id + GREEDY_SUFFIX, list(self.context_ids), DiffusionParams(
                gen_length=n, steps=n, block_length=n, temperature=0.0, remasking="low_confidence",
                cfg_scale=p.cfg_scale, decoding="exact", seed=0), self.mask_id, frozenset())
        room = self.max_tokens_per_step - self.greedy_tokens
        self.samples_per_step = max(1, min(p.batch_size, room // self.canvas_tokens))
        self.pages: list[int] = []  # never any: no KV cache
        self.first_token_time: float | None = None
        self.num_forward_steps = 0

    # -- what the scheduler reads ----------------------------------------------------------
    uses_cache = False
    kind = "loglikelihood"

    @property
    def prompt_len(self) -> int:
        """Tokens the client sent (context and continuation)."""
        return len(self.seq_ids)

    @property
    def output_ids(self) -> list[int]:
        """No answer tokens: a likelihood request commits nothing of its own."""
        return []

    @property
    def canvas_tokens(self) -> int:
        """Tokens one sample puts through the model (guidance counted twice)."""
        return len(self.seq_ids) * (2 if self.params.cfg_scale > 0 else 1)

    @property
    def greedy_tokens(self) -> int:
        return self.greedy.num_tokens if self.greedy is not None and not self.greedy.is_done else 0

    @property
    def num_tokens(self) -> int:
        """Tokens this request puts through the model in its next step."""
        remaining = self.params.mc_num - self.num_scheduled
        return min(remaining, self.samples_per_step) * self.canvas_tokens + self.greedy_tokens

    @property
    def min_step_tokens(self) -> int:
        """The fewest tokens a step of it can take: one sample and the greedy canvas."""
        return self.canvas_tokens + self.greedy_tokens

    @property
    def is_done(self) -> bool:
        return len(self.losses) == self.params.mc_num and self.greedy_tokens == 0

    def next_chunk(self) -> ScheduledScore | None:
        """The samples to score in this step (None once all are handed out)."""
        p = self.params
        n = min(p.mc_num - self.num_scheduled, self.samples_per_step)
        if n <= 0:
            return None
        first = self.num_scheduled
        self.num_scheduled += n
        return ScheduledScore(self.req_id, self.seq_ids, len(self.context_ids), list(range(first, first + n)),
                              p.batch_size, p.seed, p.cfg_scale)

    def record(self, losses: list[float] | None, greedy_commit: tuple[list[int], list[int]] | None) -> None:
        """Applies one step's results: the chunk's losses and the greedy check's commits."""
        if losses is not None:
            self.losses += losses
            self.num_forward_steps += 1
        g = self.greedy
        if greedy_commit is not None and g is not None and not g.is_done:
            g.commit(*greedy_commit)
            ctx = len(self.context_ids)
            if any(tok != self.continuation_ids[pos - ctx] for pos, tok in zip(*greedy_commit)):
                self.is_greedy = False
                self.greedy = None
            elif g.is_done:
                self.is_greedy = True
                self.greedy = None

    def result(self) -> LikelihoodResult:
        logprob, stderr = summarize(self.losses, self.params.batch_size)
        return LikelihoodResult(logprob, stderr, self.is_greedy, len(self.continuation_ids))

    def finish_status(self) -> RequestStatus:
        return RequestStatus.FINISHED_STOPPED


def summarize(losses: list[float], batch_size: int) -> tuple[float, float | None]:
    """(estimate, standard error) from every sample's L, in sample order.
    The standard error is taken over Monte Carlo batch means (batches are
    independent; rows inside one are not), or over samples when there is a
    single batch (conservative for the stratified rows); None for one sample."""
    n = len(losses)
    estimate = -sum(losses) / n
    units = [sum(losses[i:i + batch_size]) / batch_size for i in range(0, n, batch_size)]
    if len(units) < 2:
        units = losses
    if len(units) < 2:
        return estimate, None
    mean = sum(units) / len(units)
    var = sum((u - mean) ** 2 for u in units) / (len(units) - 1)
    return estimate, (var / len(units)) ** 0.5
