"""A request's decoding state, torch-free: the canvas, where it is in its
block schedule, and how much of its answer is final.

The schedule is the request's (``DiffusionParams.schedule``): LLaDA's
blocks from the prompt's end, LLaDA2's grid from position 0 (the canvas
padded to whole blocks, the answer cut at ``gen_length``; with LLaDA2.1's
token editing the current block's tokens may still change, so only whole
finished blocks become final), or Dream's single block with its timestep
quota."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from sampler.params import DiffusionParams
from server.engine.messages import TokenLogprob
from sampler.remasking import REMASKING
from sampler.schedule import (block_bounds, commit_quota_at, dream_quota, dream_timesteps, dream_transfer_ratio,
                              grid_blocks, step_seed, steps_per_block)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # an EOS/EoT or stop string ended the answer
    FINISHED_LENGTH = "length"  # the canvas was filled without one
    FINISHED_ABORTED = "abort"  # cancelled or disconnected
    FINISHED_ERROR = "error"  # failed alone; others went on

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


def block_layout(prompt_len: int, params: DiffusionParams) -> tuple[list[tuple[int, int]], int]:
    """A request's blocks, [start, end) relative to the generated part, and
    the generated part's length on the canvas (LLaDA2's grid pads it to
    whole blocks): a function of the prompt's length and the params alone."""
    if params.schedule == "llada2":
        return grid_blocks(prompt_len, params.gen_length, params.block_length)
    if params.schedule == "dream":
        return [(0, params.gen_length)], params.gen_length
    return block_bounds(params.gen_length, params.block_length), params.gen_length


@dataclass
class Request:
    req_id: str
    prompt_ids: list[int]
    params: DiffusionParams
    mask_id: int
    stop_ids: frozenset[int]  # EOS/EoT ids: the answer ends before the first one
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    kind = "generation"  # the request kinds: generation, loglikelihood

    def __post_init__(self) -> None:
        p = self.params
        self.prompt_len = len(self.prompt_ids)  # read many times a step; a request's prompt never changes
        self.blocks, padded = block_layout(len(self.prompt_ids), p)  # relative to the generated part
        self.block_ranges = [(self.prompt_len + b0, self.prompt_len + b1) for b0, b1 in self.blocks]  # absolute
        self.timesteps: list[float] = []
        if p.schedule == "llada2":
            self.block_steps = [min(p.steps, p.gen_length)] * len(self.blocks)  # the reference's cap
        elif p.schedule == "dream":
            self.block_steps = [p.steps]
            self.timesteps = dream_timesteps(p.steps, p.eps)
        else:
            self.block_steps = steps_per_block(p.steps, len(self.blocks))
        self.canvas: list[int] = list(self.prompt_ids) + [self.mask_id] * padded
        self.editing = p.editing_threshold is not None
        self.uses_cache = p.decoding != "exact"
        self.is_llada2 = p.schedule == "llada2"
        # The current block's masked positions, ascending; None = to be scanned. Kept across steps
        # (a commit removes what it fills, a new block rescans): read several times a step.
        self._masked: list[int] | None = None
        self.scheduled = None  # its ScheduledSeq, kept by the scheduler across steps (a persistent batch entry)
        self.post_steps = 0  # editing: steps taken on the current block since it had no mask left
        self.kv_len = 0  # llada2 prefix_cache: canvas positions [0, kv_len) have their keys/values stored
        self.block_idx = 0
        self.step_in_block = 0
        self.step_index = 0  # global step counter, zero-quota steps included (keys the noise)
        self.num_forward_steps = 0  # forward passes actually run for this request
        self.num_final = 0  # length of the final prefix of the generated part
        self.stop_at: int | None = None  # index in the generated part of the first stop token
        self.first_token_time: float | None = None
        self.is_adaptive = REMASKING[p.remasking].is_adaptive  # steps follow the model, not the schedule
        self.pages: list[int] = []  # KV pages, reserved at admission in the cache modes
        self.deferred_since: int | None = None  # scheduler step at which its pending fill was first deferred
        # generated-part offset -> its token's logprob at the step that (last) wrote it; None = not asked
        self.token_logprobs: list[TokenLogprob | None] | None = \
            [None] * (len(self.canvas) - self.prompt_len) if p.logprobs is not None else None
        self.max_use_tokens = self._max_use_tokens()  # fixed by the params and blocks; read every step
        # Whether a step may have nothing to commit (skip_empty_steps' work; checked every step): never
        # with an adaptive rule or LLaDA2's schedule, with LLaDA's only in a block given more steps than positions.
        self.may_skip_steps = not self.is_adaptive and not self.is_llada2 and (
            p.schedule == "dream" or any(n > b1 - b0 for n, (b0, b1) in zip(self.block_steps, self.blocks)))

    @property
    def num_tokens(self) -> int:
        """Tokens of a whole-canvas step (an exact step or a cache fill):
        the most this request ever puts through the model in one step."""
        return len(self.canvas) * (2 if self.params.cfg_scale > 0 else 1)

    def _max_use_tokens(self) -> int:
        """The most tokens one of its steps that is not a cache fill computes:
        the whole canvas (exact), block + suffix at the first block
        (prefix_cache), the longest block (dual_cache)."""
        if self.params.decoding == "prefix_cache":
            # llada2: its block (a prompt tail included), never past it
            return self.params.block_length if self.params.schedule == "llada2" else self.params.gen_length
        if self.params.decoding == "dual_cache":
            return max(b1 - b0 for b0, b1 in self.blocks)
        return self.num_tokens

    def step_tokens(self) -> int:
        """Tokens the current step puts through the model (the runner's plan)."""
        action = self.cache_action()
        if action is None or action == "fill":
            return self.num_tokens
        b0, b1 = self.block_range
        if self.is_llada2:
            return b1 - (b0 - b0 % self.params.block_length)
        return b1 - b0 if self.params.decoding == "dual_cache" else len(self.canvas) - b0

    def _block_size(self) -> int:
        b0, b1 = self.blocks[self.block_idx]
        return b1 - b0

    @property
    def block_range(self) -> tuple[int, int]:
        """Absolute [start, end) of the current block in the canvas."""
        return self.block_ranges[self.block_idx]

    def cache_action(self) -> str | None:
        """None (no cache), "fill" (the block's first step: the whole canvas,
        storing keys/values) or "use" (later steps: read them)."""
        if not self.uses_cache:
            return None
        # A block's first step is its first forward: empty steps only end a block.
        return "use" if self.step_in_block > 0 else "fill"

    def skip_empty_steps(self) -> None:
        """Steps whose quota is 0 commit nothing: pass them without a forward.
        They only end a block (the quota never grows), so jump to its end,
        counting them in step_index, which keys the noise of later steps."""
        if not self.may_skip_steps or self.is_done or self.quota() > 0:
            return
        if self.params.schedule == "dream":  # its quota may grow again as the timesteps shrink
            while self.quota() == 0 and self.params.remasking != "origin":
                self.step_index += 1
                self.step_in_block += 1
            return
        remaining = self.block_steps[self.block_idx] - self.step_in_block
        self.step_index += remaining - 1
        self.step_in_block += remaining - 1
        self._advance()

    @property
    def is_done(self) -> bool:
        return self.block_idx >= len(self.blocks) or self.stop_at is not None

    def quota(self) -> int:
        """Tokens to commit this step: the schedule's share, or for the
        adaptive rules the cap (every masked position of the block)."""
        if self.is_adaptive:
            return len(self.masked_positions())
        schedule = self.params.schedule
        if schedule == "llada2":
            if self.editing:
                return self.params.num_to_transfer
            return commit_quota_at(self.params.block_length, self.block_steps[self.block_idx], self.step_in_block)
        if schedule == "dream":
            return dream_quota(len(self.masked_positions()), self.timesteps, self.step_in_block)
        return commit_quota_at(self._block_size(), self.block_steps[self.block_idx], self.step_in_block)

    def transfer_prob(self) -> float:
        """Dream's origin: each masked position's chance to commit this step."""
        return dream_transfer_ratio(self.timesteps, self.step_in_block) if self.timesteps else 1.0

    def edit_positions(self) -> list[int]:
        """With token editing: the current block's decoded, non-prompt
        positions, whose tokens the step may re-write."""
        if not self.editing:
            return []
        b0, b1 = self.block_range
        return [i for i in range(max(b0, self.prompt_len), b1) if self.canvas[i] != self.mask_id]

    def seeds(self) -> tuple[int, int]:
        """(sampling seed, random-remasking seed) of the current step."""
        return step_seed(self.params.seed, self.step_index, 0), step_seed(self.params.seed, self.step_index, 1)

    def masked_positions(self) -> list[int]:
        """The current block's masked positions, ascending (a list the caller must not change)."""
        if self._masked is None:
            b0, b1 = self.block_ranges[self.block_idx]
            mask = self.mask_id
            self._masked = [i for i, t in enumerate(self.canvas[b0:b1], b0) if t == mask]
        return self._masked

    def commit(self, positions: list[int], tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> list[int]:
        """Writes committed tokens (and their logprobs, when asked), advances
        the schedule; returns the token ids that became final (the final
        prefix's growth)."""
        # Only token editing asks whether the step began with masks, or re-wrote tokens.
        had_masks = not self.editing or bool(self.masked_positions())
        edited = self.editing and any(self.canvas[pos] != self.mask_id for pos in positions)
        if self.is_llada2 and self.cache_action() == "fill":
            b0 = self.block_range[0]  # the step stored every finished grid block's keys/values
            self.kv_len = b0 - b0 % self.params.block_length
        canvas, mask, masked = self.canvas, self.mask_id, self._masked
        if masked is not None and positions:
            masked = self._masked = masked.copy()  # a new list: the one handed out before stays as it was
            b0, b1 = self.block_ranges[self.block_idx]
            for pos, tok in zip(positions, tokens):
                if canvas[pos] == mask and tok != mask and b0 <= pos < b1:
                    masked.remove(pos)
                canvas[pos] = tok
        else:
            for pos, tok in zip(positions, tokens):
                canvas[pos] = tok
        if logprobs is not None and self.token_logprobs is not None:
            for pos, lp in zip(positions, logprobs):
                self.token_logprobs[pos - self.prompt_len] = lp
        self.num_forward_steps += 1
        self._advance(had_masks, edited)
        return self._grow_final()

    def _advance(self, had_masks: bool = True, edited: bool = False) -> None:
        self.step_index += 1
        self.step_in_block += 1
        if self.editing:
            # LLaDA2.1: a step that began without masks and edited nothing ends
            # the block; so does a (max_post_steps + 1)-th step without masks.
            if not had_masks and not edited:
                block_over = True
            else:
                self.post_steps += 0 if self.masked_positions() else 1
                block_over = self.post_steps > self.params.max_post_steps
        elif self.is_adaptive or self.is_llada2:
            block_over = (not self.masked_positions()
                          or (not self.is_adaptive and self.step_in_block >= self.block_steps[self.block_idx]))
        else:
            block_over = self.step_in_block == self.block_steps[self.block_idx]
        if block_over:
            self.block_idx += 1
            self.step_in_block = 0
            self.post_steps = 0
            self._masked = None

    def _grow_final(self) -> list[int]:
        """A token is final once it and every position before it are
        committed; the first final stop token ends the answer (exact early
        stop: nothing after it can change what is returned)."""
        start = self.num_final
        gen = self.canvas
        n = self.prompt_len + self.num_final
        if n < len(gen) and gen[n] == self.mask_id:  # the first open position is still masked: nothing new
            return []
        limit = self.prompt_len + self.params.gen_length  # LLaDA2's padding past it is never answer
        if self.editing and self.block_idx < len(self.blocks):
            limit = min(limit, self.block_range[0])  # the current block may still be edited
        while n < limit and gen[n] != self.mask_id and self.stop_at is None:
            if gen[n] in self.stop_ids:
                self.stop_at = n - self.prompt_len
            else:
                self.num_final += 1
            n += 1
        return gen[self.prompt_len + start: self.prompt_len + self.num_final]

    @property
    def output_ids(self) -> list[int]:
        """The answer: the final prefix, which ends before the first stop token."""
        return self.canvas[self.prompt_len: self.prompt_len + self.num_final]

    @property
    def output_logprobs(self) -> list[TokenLogprob] | None:
        """The answer's logprobs, aligned with output_ids; None = not asked."""
        if self.token_logprobs is None:
            return None
        return self.token_logprobs[:self.num_final]

    def finish_status(self) -> RequestStatus:
        return RequestStatus.FINISHED_STOPPED if self.stop_at is not None else RequestStatus.FINISHED_LENGTH
