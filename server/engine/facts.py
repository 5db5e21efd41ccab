"""What callers outside the engine thread may know of the engine: an
immutable snapshot of the model's facts, taken once it is loaded, and the
checks that refuse a request before it is queued.

Nothing here reads or changes engine state (scheduler, pages, runner), so
any thread may use it; the engine runs the same checks again when it builds
the request on its own thread. A refusal is a ``RequestError`` naming the
engine's own field (``prompt``, ``gen_length``, ``decoding``, ``context``,
...); a caller that calls the field something else (the HTTP API's
``max_tokens``) names it its own way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from sampler.params import DiffusionParams, LikelihoodParams, ParamError
from server.engine.request import block_layout

if TYPE_CHECKING:  # the tokenizer is loaded by the engine; nothing here imports transformers
    from server.tokenizer import Tokenizer


class RequestError(ParamError):
    """A request the engine refuses: ``field`` in the engine's names, ``message`` without it."""


@dataclass(frozen=True)
class ModelFacts:
    model: str  # the checkpoint as given: a directory or a hub repo id
    architecture: str  # the model class serving it
    max_model_len: int  # longest prompt + canvas
    vocab_size: int  # token ids are in [0, vocab_size)
    mask_id: int
    stop_ids: frozenset[int]  # EOS/EoT ids: an answer ends before the first one
    decoding_modes: tuple[str, ...]  # the decoding modes the model supports
    is_block_causal: bool  # LLaDA2.x: the llada2 schedule is available
    max_num_batched_tokens: int  # tokens one step may put through the model
    num_kv_pages: int  # KV pool pages; 0 = no KV cache (the cache modes are refused)
    page_size: int  # tokens per KV page
    # The checkpoint's own decoding (its family's, then its generation config): DiffusionParams fields.
    decoding_defaults: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: "Tokenizer | None" = None  # encode/decode only; never changed after loading
    checkpoint_architecture: str | None = None  # the config.json architecture served (registry's: LLaDA2MoeModelLM)
    model_type: str | None = None  # config.json's model_type (llada, lladamoe, llada2_moe, llada21_moe, Dream)
    num_parameters: int = 0  # the weights this process holds (one rank's shard under tensor parallelism)
    # Example prompts from the checkpoint's model card (its README's widget): [{"title", "prompt"}]
    examples: tuple[Mapping[str, str], ...] = ()

    # -- generation ---------------------------------------------------------------------
    def check_generation(self, prompt_ids: list[int], params: DiffusionParams) -> None:
        """Raises RequestError if the engine could never run this request."""
        self._check_ids("prompt", prompt_ids)
        total = len(prompt_ids) + params.gen_length
        if total > self.max_model_len:
            raise RequestError("gen_length", f"the prompt ({len(prompt_ids)} tokens) plus the canvas "
                               f"({params.gen_length} tokens) = {total} exceeds the model's maximum length "
                               f"{self.max_model_len}")
        if params.schedule == "llada2" and not self.is_block_causal:
            raise RequestError("schedule", f"'llada2' needs a block-causal model (LLaDA2.x); {self.architecture} "
                               "attends bidirectionally")
        if params.decoding not in self.decoding_modes:
            raise RequestError("decoding", f"{params.decoding!r} is not available for this model "
                               f"({self.architecture}); it supports {', '.join(self.decoding_modes)}")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop", "stop strings need the model's tokenizer, and this checkpoint has none")
        _, padded = block_layout(len(prompt_ids), params)
        canvas = len(prompt_ids) + padded
        num_tokens = canvas * (2 if params.cfg_scale > 0 else 1)
        if num_tokens > self.max_num_batched_tokens:
            raise RequestError("gen_length", f"the canvas ({num_tokens} tokens, guidance counted twice) exceeds "
                               f"max_num_batched_tokens {self.max_num_batched_tokens}, the tokens one step may "
                               "compute")
        if params.decoding != "exact":
            if not self.num_kv_pages:
                raise RequestError("decoding", f"{params.decoding!r} needs the KV cache, which this server runs "
                                   "without (kv_cache_tokens 0)")
            if -(-canvas // self.page_size) > self.num_kv_pages:
                raise RequestError("gen_length", f"the canvas ({canvas} tokens) exceeds the KV cache "
                                   f"({self.num_kv_pages * self.page_size} tokens)")

    def blocks(self, prompt_len: int, params: DiffusionParams) -> list[tuple[int, int]]:
        """The request's blocks, [start, end) relative to the generated part."""
        return block_layout(prompt_len, params)[0]

    # -- likelihood -------------------------------------------------------------------------
    def check_likelihood(self, context_ids: list[int], continuation_ids: list[int],
                         params: LikelihoodParams) -> None:
        """Raises RequestError if the engine could never score this pair."""
        self._check_ids("context", context_ids)
        self._check_ids("continuation", continuation_ids)
        if not continuation_ids:
            raise RequestError("continuation", "must have at least one token")
        total = len(context_ids) + len(continuation_ids)
        if total > self.max_model_len:
            raise RequestError("continuation", f"context and continuation ({total} tokens) exceed the model's "
                               f"maximum length {self.max_model_len}")
        # A step of it takes at least one sample, and the greedy check's canvas (the same length) beside it.
        per_sample = total * (2 if params.cfg_scale > 0 else 1)
        if per_sample * (2 if params.check_greedy else 1) > self.max_num_batched_tokens:
            raise RequestError("continuation", f"context and continuation ({total} tokens per sample, guidance and "
                               f"the greedy check counted) exceed max_num_batched_tokens "
                               f"{self.max_num_batched_tokens}")

    def _check_ids(self, name: str, ids: list[int]) -> None:
        bad = [t for t in ids if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size)]
        if bad:
            raise RequestError(name, f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        if self.mask_id in ids:
            raise RequestError(name, f"contains the mask token id {self.mask_id}")
