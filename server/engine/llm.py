"""The offline API: ``LLM(model=...).generate(prompts, params)``.

Prompts of any lengths run as one ragged batch through the same engine the
server uses; each gets its own seeded noise, so its output never depends on
what it was batched with.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sampler.params import DiffusionParams, LikelihoodParams
from server.config import ModelConfig
from server.engine.engine import LLMEngine
from server.engine.messages import LikelihoodResult, TokenLogprob
from server.engine.request import Request
from server.engine.scheduler import SchedulerConfig

Prompt = str | list[int]
StepCallback = Callable[[str, Request], None]


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # the answer's ids, ending before the first EOS/EoT (or covering the text before a stop string)
    text: str | None  # None when the checkpoint has no tokenizer; cut before the first stop string
    finish_reason: str  # "stop" (EOS/EoT or a stop string) or "length"
    num_steps: int  # forward passes this request took
    num_committed: int  # canvas positions committed when it finished (early stop leaves some masked)
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when params.logprobs is set


class LLM:
    def __init__(self, model: str, dtype: str = "auto", device: str = "auto",
                 max_num_seqs: int = SchedulerConfig.max_num_seqs,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, kv_cache_tokens: int | None = None,
                 tensor_parallel_size: int = 1, enforce_eager: bool = True):
        """``tensor_parallel_size`` > 1 starts that many ranks (this process
        and worker processes, which end with it or with ``close``)."""
        self.engine = LLMEngine(
            ModelConfig(model=model, dtype=dtype, device=device, max_model_len=max_model_len,
                        gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                        enforce_eager=enforce_eager),
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            kv_cache_tokens=kv_cache_tokens),
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (they also end with this process)."""
        self.engine.close()

    def default_params(self, **overrides: Any) -> DiffusionParams:
        """The checkpoint's own decoding (its family's schedule and options,
        then its generation config), with ``overrides`` on top: what
        ``generate`` and ``chat`` use when given no params."""
        return DiffusionParams(**(self.engine.decoding_defaults | overrides))

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer files: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        return prompt

    def generate(self, prompts: Prompt | Sequence[Prompt], params: DiffusionParams | Sequence[DiffusionParams] | None = None,
                 on_step: StepCallback | None = None) -> list[GenerationOutput]:
        """One output per prompt, in order. ``params`` is one for all or one
        per prompt. ``on_step(req_id, request)`` sees every request after each
        of its steps (its ``canvas``, ``block_range``, ...)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or self.default_params()
        param_list = [params] * len(prompts) if isinstance(params, DiffusionParams) else list(params)
        if len(param_list) != len(prompts):
            raise ValueError(f"{len(param_list)} params for {len(prompts)} prompts")
        return self._run([self._encode(p) for p in prompts], param_list, on_step)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: DiffusionParams | None = None, on_step: StepCallback | None = None) -> list[GenerationOutput]:
        """One conversation (a list of {role, content}) or a list of them."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files, so it has no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.encode_chat(c) for c in convs]
        return self._run(ids, [params or self.default_params()] * len(ids), on_step)

    def loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]],
                      params: LikelihoodParams | None = None) -> list[LikelihoodResult]:
        """LLaDA's Monte Carlo log-likelihood bound of each (context ids,
        continuation ids) pair, in order, all in one ragged batch."""
        engine = self.engine
        params = params or LikelihoodParams()
        req_ids = [f"offline-{next(self._ids)}" for _ in pairs]
        for rid, (context, continuation) in zip(req_ids, pairs):
            engine.add(engine.make_likelihood_request(rid, context, continuation, params))
        results: dict[str, LikelihoodResult] = {}
        wanted = set(req_ids)
        try:
            while len(results) < len(req_ids):
                for out in engine.step():
                    if out.finished and out.req_id in wanted:
                        if out.finish_reason == "error":
                            raise RuntimeError(f"request {out.req_id} failed: {out.error}")
                        results[out.req_id] = out.likelihood
        finally:
            for rid in req_ids:
                if rid not in results:
                    engine.abort_request(rid)
        return [results[rid] for rid in req_ids]

    def _run(self, prompt_ids: list[list[int]], params: list[DiffusionParams],
             on_step: StepCallback | None) -> list[GenerationOutput]:
        engine = self.engine
        req_ids = [f"offline-{next(self._ids)}" for _ in prompt_ids]
        for rid, ids, p in zip(req_ids, prompt_ids, params):
            engine.add_request(rid, ids, p)
        requests = {r.req_id: r for r in engine.scheduler.waiting if r.req_id in set(req_ids)}
        results: dict[str, Any] = {}
        try:
            while len(results) < len(req_ids):
                for out in engine.step():
                    if on_step is not None and out.committed is not None:
                        on_step(out.req_id, requests[out.req_id])
                    if out.finished:
                        if out.finish_reason == "error":
                            raise RuntimeError(f"request {out.req_id} failed: {out.error}")
                        results[out.req_id] = out
        finally:
            for rid in req_ids:
                if rid not in results:
                    engine.abort_request(rid)
        outputs = []
        for rid, ids in zip(req_ids, prompt_ids):
            out, req = results[rid], requests[rid]
            text = out.text if out.text is not None else \
                self.tokenizer.decode(out.token_ids) if self.tokenizer is not None else None
            committed = sum(t != req.mask_id for t in req.canvas[req.prompt_len:])
            outputs.append(GenerationOutput(ids, out.token_ids, text, out.finish_reason, req.num_forward_steps,
                                            committed, out.logprobs))
        return outputs
