"""``POST /v1/loglikelihood``, a llada-serve extension: LLaDA's Monte Carlo
estimate of the log-likelihood bound of continuations given contexts (what
lm-eval's multiple-choice tasks need), scheduled by the engine beside
generation requests, with the same queue limit, metrics and auth.

Request: ``{"model", "requests": [{"context", "continuation"}, ...],
"mc_num", "batch_size", "seed", "cfg_scale", "check_greedy",
"add_special_tokens"}``. Each context and continuation is a string or a
token-id list. Token ids are used as given. Strings are encoded without
special tokens unless ``add_special_tokens``; when both are strings the
continuation is what encoding context + continuation adds after the
context's tokens (as lm-eval and LLaDA's eval_llada.py split a pair), or,
where the two encodings disagree on the boundary, the continuation encoded
alone. Every pair uses the same ``seed``: a pair's estimate depends only on
the pair and the seed, wherever it stands in the list and whatever else the
server runs.

Answer: ``{"object": "loglikelihood", "model", "results": [{"logprob",
"is_greedy", "num_tokens", "stderr"}, ...], "usage"}`` in request order.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt

from sampler.params import LikelihoodParams, ParamError
from server.api.drain import SHUTDOWN, Drain
from server.api.errors import APIError
from server.api.protocol import RequestBody
from server.engine.async_engine import EngineDeadError, EngineNotReadyError, QueueFullError

QUEUE_FULL = ("the server is at capacity: too many queued requests, retry later", "rate_limit_error", None,
              "queue_full", {"Retry-After": "1"})


class LoglikelihoodPair(RequestBody):
    context: str | list[StrictInt]
    continuation: str | list[StrictInt]


class LoglikelihoodRequest(RequestBody):
    model: str | None = None
    requests: Annotated[list[LoglikelihoodPair], Field(min_length=1, max_length=256)]
    mc_num: Annotated[StrictInt, Field(ge=1, le=4096)] = Field(128, description="Monte Carlo samples per pair")
    batch_size: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="samples per stratified batch; must divide mc_num (default: its largest divisor up to 16)")
    seed: StrictInt | None = Field(None, description="seeds the mask draws (every pair the same); default random")
    cfg_scale: Annotated[float, Field(ge=0, le=100)] = Field(0.0, description="classifier-free guidance scale")
    check_greedy: StrictBool = Field(True, description="run the greedy check (is_greedy); false: is_greedy null")
    add_special_tokens: StrictBool = Field(False, description="encode strings with the tokenizer's special tokens")


class LoglikelihoodServing:
    def __init__(self, engine, model_name: str, drain: Drain | None = None):
        self.engine = engine  # server.engine.async_engine.AsyncEngine
        self.model_name = model_name
        self.drain = drain or Drain()  # ends what is still running at the drain deadline

    def _encode(self, pair: LoglikelihoodPair, special: bool, index: int) -> tuple[list[int], list[int]]:
        ctx, cont = pair.context, pair.continuation
        if isinstance(ctx, list) and isinstance(cont, list):
            return list(ctx), list(cont)
        facts = self.engine.facts
        tok = facts.tokenizer if facts is not None else None
        if tok is None:
            raise APIError.bad_request(f"requests[{index}]: this model has no tokenizer: send token-id lists",
                                       f"requests[{index}]")
        ctx_ids = list(ctx) if isinstance(ctx, list) else tok.encode(ctx, add_special_tokens=special)
        if isinstance(cont, list):
            return ctx_ids, list(cont)
        if isinstance(ctx, str):
            whole = tok.encode(ctx + cont, add_special_tokens=special)
            if whole[:len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
                return ctx_ids, whole[len(ctx_ids):]
        return ctx_ids, tok.encode(cont, add_special_tokens=False)

    async def run(self, body: LoglikelihoodRequest, raw_request) -> dict[str, Any]:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist.", "not_found_error", "model",
                           "model_not_found")
        try:
            params = LikelihoodParams(mc_num=body.mc_num, batch_size=body.batch_size, cfg_scale=body.cfg_scale,
                                      check_greedy=body.check_greedy, seed=body.seed)
        except ParamError as e:
            raise APIError.refused(e) from None
        resp_id = "ll-" + uuid.uuid4().hex
        pairs = []
        for i, pair in enumerate(body.requests):
            ctx, cont = self._encode(pair, body.add_special_tokens, i)
            try:
                self.engine.validate_likelihood(ctx, cont, params)
            except ParamError as e:
                raise APIError.refused(e, {e.field: f"requests[{i}].{e.field}"}) from None
            except (EngineDeadError, EngineNotReadyError) as e:
                raise APIError(503, str(e), "server_error", None, "unavailable") from None
            pairs.append((f"{resp_id}-{i}", ctx, cont))
        if self.engine.num_waiting + len(pairs) > self.engine.max_queued_requests:
            raise APIError(429, *QUEUE_FULL)
        streams = []
        try:
            for req_id, ctx, cont in pairs:
                streams.append(self.engine.submit_likelihood(req_id, ctx, cont, params))
        except (QueueFullError, EngineDeadError, EngineNotReadyError) as e:
            for req_id, _, _ in pairs[:len(streams)]:
                self.engine.abort(req_id)
            if isinstance(e, QueueFullError):
                raise APIError(429, *QUEUE_FULL) from None
            raise APIError(503, str(e), "server_error", None, "unavailable") from None
        results = await self._collect(streams, raw_request)
        used = sum(len(ctx) + len(cont) for _, ctx, cont in pairs)
        return {"id": resp_id, "object": "loglikelihood", "created": int(time.time()), "model": self.model_name,
                "results": results, "usage": {"prompt_tokens": used, "total_tokens": used}}

    async def _collect(self, streams: list, raw_request) -> list[dict[str, Any]]:
        async def one(stream) -> dict[str, Any]:
            try:
                async for out in stream:
                    if out.finished:
                        if out.finish_reason == "error" or out.likelihood is None:
                            raise APIError(500, f"the request failed: {out.error}", "server_error", None,
                                           "internal_error")
                        r = out.likelihood
                        return {"logprob": r.logprob, "is_greedy": r.is_greedy, "num_tokens": r.num_tokens,
                                "stderr": r.stderr}
                raise APIError(500, "the request ended without a result", "server_error", None, "internal_error")
            except (EngineDeadError, EngineNotReadyError) as e:
                raise APIError(503, str(e), "server_error", None, "unavailable") from None
            finally:
                await stream.aclose()

        tasks = [asyncio.ensure_future(one(s)) for s in streams]

        async def watch() -> None:
            while True:
                await asyncio.sleep(0.25)
                if await raw_request.is_disconnected():
                    for t in tasks:
                        t.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        forget = self.drain.on_deadline(lambda: [t.cancel() for t in tasks])
        try:
            return list(await asyncio.gather(*tasks))
        except asyncio.CancelledError:
            if self.drain.expired:
                raise APIError(503, *SHUTDOWN) from None
            raise APIError(499, "client disconnected", "invalid_request_error") from None
        finally:
            forget()
            watcher.cancel()
            for t in tasks:
                t.cancel()
