"""What crosses the engine's boundaries: plain dataclasses, no torch."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScheduledSeq:
    """One request's denoising step, as the runner needs it.

    The scheduler keeps one per running request and refreshes its per-step
    fields (rows, quota, seeds, block, cache_action, kv_len, edit_rows,
    transfer_prob) in place at each ``schedule()``: what a step's output
    holds is valid until the next ``schedule()``."""

    req_id: str
    canvas: list[int]  # prompt + generated part, mask_id where still masked
    prompt_len: int  # the generated part starts here
    rows: list[int]  # canvas positions that get logits: the current block's masked positions
    quota: int  # tokens to commit this step
    temperature: float
    top_k: int  # <= 0 = no limit
    top_p: float  # 1 = no limit
    seed: int  # Philox seed of this step's sampling noise
    random_seed: int  # Philox seed of this step's random-remasking scores
    remasking: str  # strategy name
    cfg_scale: float  # 0 = no guidance
    threshold: float  # tau of the threshold rule
    factor: float  # f of the factor rule
    block: tuple[int, int]  # absolute [start, end) of the current block in the canvas
    decoding: str  # exact | prefix_cache | dual_cache
    cache_action: str | None  # None, "fill" (store keys/values) or "use" (read them)
    pages: list[int]  # the request's KV pages (cache modes)
    schedule: str = "llada"  # llada | llada2 | dream (sampler.params.SCHEDULES)
    block_length: int = 0  # llada2: the block grid's length (block-causal attention over it)
    kv_len: int = 0  # llada2 prefix_cache: positions [0, kv_len) already have stored keys/values
    edit_rows: list[int] = field(default_factory=list)  # LLaDA2.1 editing: decoded positions it may re-write
    editing_threshold: float = 0.0  # an edit needs confidence above this
    transfer_prob: float = 1.0  # Dream's origin: each masked row commits with this probability
    alg_temp: float = 0.0  # Dream: > 0 draws the committed positions (Gumbel top-k over confidence / alg_temp)
    num_logprobs: int | None = None  # committed tokens' logprobs with this many alternatives; None = not asked


@dataclass
class TokenLogprob:
    """A committed token's log-probability under the model's distribution at
    the position and step it was committed (log-softmax of that step's
    logits, after classifier-free guidance, before temperature, top-k and
    top-p), and the likeliest tokens there."""

    logprob: float
    top: list[tuple[int, float]]  # the k likeliest (token id, logprob), likeliest first


@dataclass
class ScheduledScore:
    """Monte Carlo samples of one likelihood request to score in this step:
    each is one forward pass of the sequence with some continuation tokens
    masked (sampler.likelihood draws which, from the seed)."""

    req_id: str
    seq_ids: list[int]  # context + continuation, unmasked
    context_len: int  # the continuation starts here; the context is never masked
    sample_ids: list[int]  # global Monte Carlo sample indices to score now
    batch_size: int  # samples per stratified batch (sample s is row s % batch_size of batch s // batch_size)
    seed: int  # the request's mask-draw seed
    cfg_scale: float  # 0 = no guidance


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # those that take a step now
    scores: list[ScheduledScore] = field(default_factory=list)  # likelihood samples scored now
    admitted: list[str] = field(default_factory=list)  # req_ids moved from waiting to running
    # req_id -> error: requests whose own state broke scheduling; failed and removed, the rest go on
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class RunnerOutput:
    # req_id -> (committed canvas positions, their tokens)
    commits: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    # req_id -> the model's probability of each committed token, aligned with commits[req_id]
    confidences: dict[str, list[float]] = field(default_factory=dict)
    # req_id -> each committed token's TokenLogprob, aligned with commits[req_id] (requests that ask only)
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # req_id -> each scored sample's weighted loss L, aligned with ScheduledScore.sample_ids
    scores: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class LikelihoodResult:
    """A finished likelihood estimate."""

    logprob: float  # -mean of the samples' L: the Monte Carlo estimate of the log-likelihood bound
    stderr: float | None  # its standard error (None with a single sample)
    is_greedy: bool | None  # whether greedy decoding from the context gives the continuation; None = not checked
    num_tokens: int  # continuation tokens


@dataclass
class RequestOutput:
    """A request's progress after one engine step."""

    req_id: str
    new_token_ids: list[int]  # tokens that became final in this step
    token_ids: list[int]  # the whole final prefix so far (ends before any stop token)
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    committed: tuple[list[int], list[int]] | None = None  # this step's (positions, tokens)
    confidences: list[float] | None = None  # this step's committed tokens' probabilities, aligned with committed
    num_steps: int = 0  # forward passes the request has taken so far
    likelihood: LikelihoodResult | None = None  # a finished likelihood request's result
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when the request asked for them
    # With stop strings: the answer's text, cut before the first stop string; while
    # running, only its settled part (server/engine/stop_strings.py). None without.
    text: str | None = None
