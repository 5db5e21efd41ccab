"""DiffusionParams: the decoding settings of one generation request, and
LikelihoodParams: those of one likelihood estimate; each validated once."""
from __future__ import annotations

import random
from dataclasses import dataclass

from sampler.remasking import REMASKING

# exact: the whole canvas every step (equals the reference); prefix_cache and
# dual_cache (Fast-dLLM): the whole canvas at each block's first step, caching
# the prefix (and suffix) keys/values, then only block + suffix (only the block).
DECODING = ("exact", "prefix_cache", "dual_cache")

# Whose generate() lays out the steps (each model's default comes from its
# family and generation config):
# llada: blocks from the prompt's end, ``steps`` over the whole answer, each
#   step commits the block's masks split evenly over its steps;
# llada2: blocks on a grid from canvas position 0 (LLaDA2's block-causal
#   attention uses the same grid), ``steps`` per block, each step's quota the
#   block length split over them; a block ends when it has no mask left;
#   ``editing_threshold`` turns on LLaDA2.1's token editing;
# dream: one block over the whole answer, ``steps`` timesteps
#   linspace(1, eps), each step commits int(n * (1 - s/t)) of the n masked.
SCHEDULES = ("llada", "llada2", "dream")

# The most alternatives a request may ask for per returned token (vLLM's
# default max_logprobs; OpenAI's chat allows 20, its completions 5).
MAX_LOGPROBS = 20


class ParamError(ValueError):
    """A bad setting: ``field`` is the parameter's own name (callers that
    call it something else, such as the HTTP API, name it their way);
    ``message`` says what is wrong without naming it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class DiffusionParams:
    gen_length: int = 128  # canvas tokens after the prompt (OpenAI's max_tokens)
    steps: int | None = None  # denoising steps over the whole canvas; None = gen_length
    block_length: int = 32  # semi-autoregressive block size; >= gen_length = pure diffusion
    temperature: float = 0.0  # Gumbel-max sampling temperature; 0 = greedy
    top_k: int = 0  # sample x0 among the k likeliest tokens; 0 or -1 = all (temperature > 0 only)
    top_p: float = 1.0  # sample x0 within this probability mass; 1 = all (temperature > 0 only)
    cfg_scale: float = 0.0  # classifier-free guidance (the prompt masked out); 0 = off
    remasking: str = "low_confidence"  # which masked positions to commit, by name (sampler.remasking)
    threshold: float = 0.9  # the "threshold" rule: commit every position at least this confident
    factor: float = 1.0  # the "factor" rule (Fast-dLLM): commit the top n while c_n >= 1 - factor / (n + 1)
    decoding: str = "exact"  # exact | prefix_cache | dual_cache (DECODING)
    seed: int | None = None  # seeds the request's noise; None = drawn at creation
    ignore_eos: bool = False  # EOS/EoT are ordinary tokens: no early stop, the answer is the whole canvas
    schedule: str = "llada"  # llada | llada2 | dream (SCHEDULES)
    editing_threshold: float | None = None  # llada2: re-write decoded tokens above this confidence (LLaDA2.1)
    max_post_steps: int = 16  # llada2 editing: editing steps after a block has no mask left
    num_to_transfer: int = 1  # llada2 editing: tokens each step commits at least (it replaces the quota)
    alg_temp: float = 0.0  # dream: > 0 draws which positions commit, softmax(confidence / alg_temp)
    eps: float = 1e-3  # dream: the last timestep
    logprobs: int | None = None  # report each answer token's logprob and this many likeliest alternatives; None = off
    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one its final text holds

    def __post_init__(self) -> None:
        self.validate()
        if self.steps is None:
            self.steps = self.gen_length
        if self.seed is None:
            self.seed = random.getrandbits(63)

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        def check(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ParamError(field, msg)

        for name in ("gen_length", "block_length"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                  f"must be a positive integer, got {value!r}")
        steps = self.gen_length if self.steps is None else self.steps
        check(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1, "steps",
              f"must be a positive integer, got {steps!r}")
        num_blocks = -(-self.gen_length // self.block_length)
        check(self.schedule in SCHEDULES, "schedule",
              f"unknown schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        check(self.schedule != "llada" or steps >= num_blocks, "steps",
              f"{steps} steps cannot cover {num_blocks} blocks (a canvas of {self.gen_length} tokens in blocks "
              f"of {self.block_length}); use at least one step per block")
        check(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100, "temperature",
              f"must be a number in [0, 100], got {self.temperature!r}")
        check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and -1 <= self.top_k < 2**31, "top_k",
              f"must be an integer in [-1, 2**31) (0 or -1: no limit), got {self.top_k!r}")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
              f"must be a number in (0, 1], got {self.top_p!r}")
        check(isinstance(self.cfg_scale, (int, float)) and 0 <= self.cfg_scale <= 100, "cfg_scale",
              f"must be a number in [0, 100], got {self.cfg_scale!r}")
        check(self.remasking in REMASKING, "remasking",
              f"unknown strategy {self.remasking!r}; one of {', '.join(sorted(REMASKING))}")
        check(isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1, "threshold",
              f"must be a number in (0, 1], got {self.threshold!r}")
        check(isinstance(self.factor, (int, float)) and self.factor > 0, "factor",
              f"must be a positive number, got {self.factor!r}")
        check(self.decoding in DECODING, "decoding",
              f"unknown mode {self.decoding!r}; one of {', '.join(DECODING)}")
        check(self.decoding == "exact" or not self.cfg_scale, "cfg_scale",
              f"classifier-free guidance needs decoding 'exact', not {self.decoding!r}")
        rule = REMASKING[self.remasking].rule
        check(rule != "bernoulli" or self.schedule == "dream", "remasking",
              f"{self.remasking!r} needs the dream schedule (its transfer probability), not {self.schedule!r}")
        check(self.schedule != "dream" or rule in ("quota", "bernoulli"), "remasking",
              f"{self.remasking!r} does not fit the dream schedule (it fixes how many commit per step)")
        check(rule != "threshold_quota" or self.schedule == "llada2", "remasking",
              f"{self.remasking!r} needs the llada2 schedule, not {self.schedule!r}")
        check(self.schedule == "llada" or not self.cfg_scale, "cfg_scale",
              f"classifier-free guidance needs the llada schedule, not {self.schedule!r}")
        if self.editing_threshold is not None:
            check(isinstance(self.editing_threshold, (int, float)) and not isinstance(self.editing_threshold, bool)
                  and 0 < self.editing_threshold <= 1, "editing_threshold",
                  f"must be a number in (0, 1] or null, got {self.editing_threshold!r}")
            check(self.schedule == "llada2", "editing_threshold",
                  f"token editing needs the llada2 schedule, not {self.schedule!r}")
        check(isinstance(self.max_post_steps, int) and not isinstance(self.max_post_steps, bool)
              and 0 <= self.max_post_steps <= 4096, "max_post_steps",
              f"must be an integer in [0, 4096], got {self.max_post_steps!r}")
        check(isinstance(self.num_to_transfer, int) and not isinstance(self.num_to_transfer, bool)
              and self.num_to_transfer >= 1, "num_to_transfer",
              f"must be a positive integer, got {self.num_to_transfer!r}")
        check(isinstance(self.alg_temp, (int, float)) and not isinstance(self.alg_temp, bool)
              and 0 <= self.alg_temp <= 100, "alg_temp", f"must be a number in [0, 100], got {self.alg_temp!r}")
        check(isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool) and 0 < self.eps < 1, "eps",
              f"must be a number in (0, 1), got {self.eps!r}")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                        and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
              f"must be an integer in [0, {MAX_LOGPROBS}] or null, got {self.logprobs!r}")
        check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
              f"must be a tuple of non-empty strings, got {self.stop!r}")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                    and -2**63 <= self.seed < 2**64), "seed",
              f"must be an integer that fits in 64 bits, got {self.seed!r}")


def default_batch_size(mc_num: int) -> int:
    """The largest divisor of ``mc_num`` up to 16 (the reference's default batch)."""
    return max(d for d in range(1, min(16, mc_num) + 1) if mc_num % d == 0)


@dataclass
class LikelihoodParams:
    """The settings of one likelihood estimate (LLaDA's get_log_likelihood)."""

    mc_num: int = 128  # Monte Carlo samples (the reference's default)
    batch_size: int | None = None  # samples per stratified batch; None = default_batch_size(mc_num)
    cfg_scale: float = 0.0  # classifier-free guidance on the mask predictor; 0 = off
    check_greedy: bool = True  # also run the greedy check (is_greedy); False = is_greedy None
    seed: int | None = None  # seeds the mask draws; None = drawn at creation

    def __post_init__(self) -> None:
        self.validate()
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.mc_num)
        if self.seed is None:
            self.seed = random.getrandbits(63)

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (is_int(self.mc_num) and 1 <= self.mc_num <= 65536):
            raise ParamError("mc_num", f"must be an integer in [1, 65536], got {self.mc_num!r}")
        if self.batch_size is not None:
            if not (is_int(self.batch_size) and self.batch_size >= 1):
                raise ParamError("batch_size", f"must be a positive integer, got {self.batch_size!r}")
            if self.mc_num % self.batch_size:
                raise ParamError("batch_size", f"must divide mc_num ({self.mc_num}), got {self.batch_size}")
        if not (isinstance(self.cfg_scale, (int, float)) and not isinstance(self.cfg_scale, bool)
                and 0 <= self.cfg_scale <= 100):
            raise ParamError("cfg_scale", f"must be a number in [0, 100], got {self.cfg_scale!r}")
        if not isinstance(self.check_greedy, bool):
            raise ParamError("check_greedy", f"must be a boolean, got {self.check_greedy!r}")
        if self.seed is not None and not (is_int(self.seed) and -2**63 <= self.seed < 2**64):
            raise ParamError("seed", f"must be an integer that fits in 64 bits, got {self.seed!r}")
