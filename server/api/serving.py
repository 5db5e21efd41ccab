"""Completions and chat completions: from an OpenAI request to engine
requests and back, non-streamed or as server-sent events.

A token is streamed once it is *final*: committed, with every position
before it committed. Text is decoded incrementally from the final prefix,
holding back an incomplete UTF-8 character. Stop strings are the engine's
(server/engine/stop_strings.py): it ends the answer at the first one and
reports only text that no stop string can take back.

With ``stream_options.include_denoising`` a stream also carries, before each
step's content, one ``denoising.step`` event per denoising step of each
choice: what that step committed, where (positions relative to the generated
part), as which tokens and text pieces, with the model's confidence.

A request fans out into prompts x ``n`` choices, each an engine request.
The fan-out is bounded before anything is built, from counts alone: more
choices than the queue can ever hold is a 400 naming ``n`` or ``prompt``
(never a retryable 429); more than it has room for now is a 429; a prompt
that alone fills the model's length is a 400 before its choices are made.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict, replace
from typing import Any, AsyncIterator

from sampler.params import DiffusionParams, ParamError
from server.api.choices import Choice
from server.api.drain import SHUTDOWN, Drain
from server.api.errors import APIError
from server.api.logprobs import final_logprobs, logprobs_delta
from server.api.protocol import WHY_UNSUPPORTED, ChatCompletionRequest, CompletionRequest, DiffusionFields
from server.engine.async_engine import EngineDeadError, EngineNotReadyError, QueueFullError
from server.engine.facts import ModelFacts

QUEUE_FULL = ("the server is at capacity: too many queued requests, retry later", "rate_limit_error", None,
              "queue_full", {"Retry-After": "1"})

logger = logging.getLogger("llada_serve.requests")


class OpenAIServing:
    def __init__(self, engine, config, model_name: str, drain: Drain | None = None):
        self.engine = engine  # server.engine.async_engine.AsyncEngine
        self.config = config  # server.config.ServerConfig
        self.model_name = model_name
        self.drain = drain or Drain()  # ends what is still running at the drain deadline

    @property
    def facts(self) -> ModelFacts:
        """The model's facts (routes check the engine is ready first)."""
        facts = self.engine.facts
        if facts is None:
            raise APIError(503, "the model is still loading", "server_error", None, "loading", {"Retry-After": "5"})
        return facts

    @property
    def tokenizer(self):
        tok = self.facts.tokenizer
        if tok is None:
            raise APIError.bad_request("this model has no tokenizer: send prompts as token ids", "prompt")
        return tok

    # -- requests -> engine ---------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    def check_common(self, req: DiffusionFields) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", "not_found_error", "model", "model_not_found")
        bad = req.unsupported()
        if bad:
            raise APIError.bad_request(f"{bad}: {WHY_UNSUPPORTED.get(bad, 'not supported by this server')}", bad)

    @staticmethod
    def max_tokens_field(req: DiffusionFields) -> str:
        """The name the client gave the canvas length (errors name it)."""
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "max_tokens"

    def request_default(self, name: str) -> int:
        """A request's ``gen_length`` / ``block_length`` when it gives none:
        the server's flag, else the model's recommendation, else DiffusionParams'."""
        flag = {"gen_length": self.config.default_max_tokens, "block_length": self.config.default_block_length}[name]
        if flag is not None:
            return flag
        return self.facts.decoding_defaults.get(name, getattr(DiffusionParams, name))

    # Request fields that are DiffusionParams fields of the same name (null or absent: the default).
    _DECODING_FIELDS = ("steps", "block_length", "temperature", "top_k", "top_p", "cfg_scale", "remasking",
                        "decoding", "threshold", "factor", "schedule", "max_post_steps", "num_to_transfer",
                        "alg_temp", "eps")

    def model_description(self) -> dict:
        """What /v1/models and the playground show of the served model:
        its architecture, ids, lengths, and the decoding a request that gives
        no settings gets (the model's defaults under the server's flags)."""
        facts = self.facts
        defaults = asdict(self.params(CompletionRequest(prompt=[0]), None, 0))
        decoding = {"max_tokens": defaults.pop("gen_length")}
        decoding.update({k: v for k, v in defaults.items() if k not in ("seed", "ignore_eos", "logprobs", "stop")})
        return {"architecture": facts.checkpoint_architecture, "model_type": facts.model_type,
                "model_class": facts.architecture, "max_model_len": facts.max_model_len,
                "mask_token_id": facts.mask_id, "stop_token_ids": sorted(facts.stop_ids),
                "vocab_size": facts.vocab_size, "decoding_modes": list(facts.decoding_modes), "decoding": decoding,
                "num_parameters": facts.num_parameters, "examples": [dict(e) for e in facts.examples]}

    def params(self, req: DiffusionFields, max_tokens: int | None, choice: int) -> DiffusionParams:
        """The model's decoding defaults (its family's, then its generation
        config), the server's --default-* flags over them, the request's
        fields over both."""
        cfg = self.config
        gen_length = max_tokens if max_tokens is not None else self.request_default("gen_length")
        fields = {k: v for k, v in self.facts.decoding_defaults.items() if k != "gen_length"}
        flags = dict(steps=cfg.default_steps, block_length=cfg.default_block_length, decoding=cfg.default_decoding,
                     remasking=cfg.default_remasking, threshold=cfg.default_threshold)
        fields.update({k: v for k, v in flags.items() if v is not None})
        steps_given = req.steps is not None
        fields.update({k: getattr(req, k) for k in self._DECODING_FIELDS if getattr(req, k) is not None})
        if "editing_threshold" in req.model_fields_set:  # an explicit null turns LLaDA2.1's editing off
            fields["editing_threshold"] = req.editing_threshold
        steps = fields.get("steps")
        if (steps is not None and not steps_given and fields.get("schedule", "llada") == "llada"
                and isinstance(gen_length, int) and gen_length > 0):
            # A default number of steps still gives every block one.
            fields["steps"] = max(steps, -(-gen_length // max(fields.get("block_length", 32), 1)))
        name = self.max_tokens_field(req)
        if req.logprobs is not None and req.logprobs is not False and self.facts.tokenizer is None:  # 0 asks too
            raise APIError.bad_request("logprobs: this model has no tokenizer to spell the tokens", "logprobs")
        if not isinstance(gen_length, int) or gen_length < 1:
            raise APIError.bad_request(f"{name}: must be a positive integer, got {gen_length!r}", name)
        try:
            return DiffusionParams(
                gen_length=gen_length, **fields,
                seed=None if req.seed is None else (req.seed + choice) % 2**63, ignore_eos=req.ignore_eos,
                logprobs=req.num_logprobs(),
                stop=tuple(req.stop_list()),
            )
        except ParamError as e:
            raise APIError.refused(e, {"gen_length": name}) from None
        except ValueError as e:  # the protocol's own "field: message"
            raise APIError.bad_request(str(e)) from None

    def num_prompts(self, req: CompletionRequest | ChatCompletionRequest) -> int:
        p = getattr(req, "prompt", None)
        return len(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else 1

    def check_fan_out(self, num_prompts: int, n: int) -> None:
        """Refuses, from counts alone, a fan-out the queue can never hold
        (400) or cannot hold now (429)."""
        limit = self.engine.max_queued_requests
        why = f"the server queues at most {limit} requests (--max-queued-requests), one per choice"
        if n > limit:
            raise APIError.bad_request(f"n: {n} choices can never be queued: {why}", "n")
        if num_prompts * n > limit:
            if n == 1:
                raise APIError.bad_request(f"prompt: {num_prompts} prompts can never be queued: {why}", "prompt")
            raise APIError.bad_request(
                f"n: {num_prompts} prompts x n {n} = {num_prompts * n} choices can never be queued: {why}", "n")
        if self.engine.num_waiting + num_prompts * n > limit:
            raise APIError(429, *QUEUE_FULL)

    def check_prompt_lengths(self, prompts: list[list[int]]) -> None:
        """A prompt that alone reaches the model's length is refused before
        any of its choices is built (each would copy it)."""
        limit = self.max_model_len
        for i, p in enumerate(prompts):
            if len(p) >= limit:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise APIError.bad_request(
                    f"{where}: {len(p)} tokens leave no room for an answer within the model's maximum "
                    f"length {limit}", "prompt")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        special = req.add_special_tokens
        if isinstance(p, str):
            return [self.tokenizer.encode(p, special)]
        if not p:
            raise APIError.bad_request("prompt: must not be empty", "prompt")
        if isinstance(p[0], int):
            return [list(p)]
        if isinstance(p[0], str):
            return [self.tokenizer.encode(s, special) for s in p]
        if any(not ids for ids in p):
            raise APIError.bad_request("prompt: a token-id prompt must not be empty", "prompt")
        return [list(ids) for ids in p]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            return self.tokenizer.encode_chat(messages)
        except APIError:
            raise
        except Exception as e:  # template errors (e.g. roles the template refuses)
            raise APIError.bad_request(f"messages: {e}", "messages") from None

    async def run(self, kind: str, req: CompletionRequest | ChatCompletionRequest, raw_request) -> Any:
        """Validates, queues every choice, and answers (JSON or SSE)."""
        self.check_common(req)
        self.check_fan_out(self.num_prompts(req), req.n)
        if kind == "chat":
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            prompts = [self.chat_prompt(req)]
        else:
            prompts, max_tokens = self.completion_prompts(req), req.max_tokens
        self.check_prompt_lengths(prompts)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        resp_id = prefix + uuid.uuid4().hex
        base = self.params(req, max_tokens, 0)
        for prompt in prompts:  # the choices of a prompt differ only in their seeds
            try:
                self.engine.validate(prompt, base)
            except ParamError as e:
                raise APIError.refused(e, {"gen_length": self.max_tokens_field(req)}) from None
            except (EngineDeadError, EngineNotReadyError) as e:
                raise APIError(503, str(e), "server_error", None, "unavailable") from None
        choices, submissions = [], []
        for p_idx, prompt in enumerate(prompts):
            blocks = self.facts.blocks(len(prompt), base)
            for i in range(req.n):
                index = p_idx * req.n + i
                # Each choice its own noise: seed + index, or a fresh draw.
                params = base if index == 0 else \
                    replace(base, seed=None if req.seed is None else (req.seed + index) % 2**63)
                choices.append(Choice(index, f"{resp_id}-{index}", len(prompt), blocks=blocks,
                                      logprobs=None if params.logprobs is None else []))
                submissions.append((prompt, params))
        started = time.monotonic()
        streams = []
        every_step = bool(req.stream and req.stream_options is not None and req.stream_options.include_denoising)
        try:  # queued now, before any response starts: overload is a real 429, streamed or not
            for c, (prompt, params) in zip(choices, submissions):
                streams.append(self.engine.submit(c.req_id, prompt, params, every_step))
        except (QueueFullError, EngineDeadError, EngineNotReadyError) as e:
            for c in choices[:len(streams)]:
                self.engine.abort(c.req_id)
            if isinstance(e, QueueFullError):
                raise APIError(429, *QUEUE_FULL) from None
            raise APIError(503, str(e), "server_error", None, "unavailable") from None
        if req.stream:
            return self.sse(kind, resp_id, req, choices, streams, started)
        await self.collect(choices, streams, raw_request)
        return self.final_body(kind, resp_id, req, choices, started)

    # -- consuming engine outputs --------------------------------------------------------
    async def _consume(self, choice: Choice, stream: AsyncIterator, on_update=None, on_step=None) -> None:
        decode = self.tokenizer_decode
        try:
            async for out in stream:
                choice.num_steps = out.num_steps
                if out.finished and out.finish_reason == "error":
                    raise APIError(500, f"the request failed: {out.error}", "server_error", None, "internal_error")
                if on_step is not None and out.committed is not None:
                    await on_step(choice, out)
                choice.update(out, decode)
                if on_update is not None:
                    await on_update(choice, out.finished)
                if out.finished:
                    break
        except (EngineDeadError, EngineNotReadyError) as e:
            raise APIError(503, str(e), "server_error", None, "unavailable") from None
        finally:
            await stream.aclose()

    def tokenizer_decode(self, ids: list[int]) -> str:
        tok = self.facts.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def denoising_event(self, resp_id: str, c: Choice, out) -> dict:
        """The ``denoising.step`` event of one engine output that committed."""
        positions, tokens = out.committed
        offsets = [p - c.prompt_len for p in positions]
        if offsets:  # a step commits only inside its block
            c.block = next(b for b, (start, end) in enumerate(c.blocks) if start <= offsets[0] < end)
        c.num_denoised += 1
        tok = self.facts.tokenizer
        pieces = tok.token_pieces(tokens) if tok is not None else [None] * len(tokens)
        confidences = out.confidences if out.confidences is not None else [None] * len(tokens)
        committed = [{"position": p, "token": t, "text": piece, "confidence": None if conf is None else round(conf, 4)}
                     for p, t, piece, conf in zip(offsets, tokens, pieces, confidences)]
        return {"object": "denoising.step", "id": resp_id, "choice": c.index, "step": c.num_denoised,
                "block": c.block, "num_blocks": len(c.blocks), "block_range": list(c.blocks[c.block]),
                "gen_length": c.blocks[-1][1], "committed": committed}

    async def collect(self, choices: list[Choice], streams: list, raw_request) -> None:
        tasks = [asyncio.ensure_future(self._consume(c, s)) for c, s in zip(choices, streams)]
        watcher = asyncio.ensure_future(self._watch_disconnect(raw_request, tasks))
        forget = self.drain.on_deadline(lambda: [t.cancel() for t in tasks])
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            if self.drain.expired:
                raise APIError(503, *SHUTDOWN) from None
            raise APIError(499, "client disconnected", "invalid_request_error") from None
        finally:
            forget()
            watcher.cancel()
            for t in tasks:
                t.cancel()

    @staticmethod
    async def _watch_disconnect(raw_request, tasks) -> None:
        while True:
            await asyncio.sleep(0.25)
            if await raw_request.is_disconnected():
                for t in tasks:
                    t.cancel()
                return

    # -- responses -----------------------------------------------------------------------
    def final_body(self, kind: str, resp_id: str, req, choices: list[Choice], started: float) -> dict:
        usage = self._usage(req, choices)
        self._log(resp_id, choices, usage, started)
        tok, decode = self.facts.tokenizer, self.tokenizer_decode
        if kind == "chat":
            out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": final_logprobs(kind, tok, decode, c), "finish_reason": c.finish_reason}
                   for c in choices]
            obj = "chat.completion"
        else:
            out = [{"index": c.index, "text": c.text, "logprobs": final_logprobs(kind, tok, decode, c),
                    "finish_reason": c.finish_reason} for c in choices]
            obj = "text_completion"
        return {"id": resp_id, "object": obj, "created": int(time.time()), "model": self.model_name,
                "choices": out, "usage": usage}

    def _usage(self, req, choices: list[Choice]) -> dict[str, int]:
        """Tokens billed: each prompt once; per choice its final tokens so far
        (after a stop string the engine keeps only the fewest whose text
        covers what was returned)."""
        prompt = sum(c.prompt_len for c in choices if c.index % req.n == 0)
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _log(self, resp_id: str, choices: list[Choice], usage: dict, started: float) -> None:
        logger.info(json.dumps({
            "id": resp_id, "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "steps": sum(c.num_steps for c in choices), "latency_s": round(time.monotonic() - started, 4),
            "finish_reason": [c.finish_reason for c in choices]}))

    async def sse(self, kind: str, resp_id: str, req, choices: list[Choice], streams: list,
                  started: float) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()

        options = req.stream_options
        continuous = options is not None and options.include_usage and options.continuous_usage_stats

        def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
            body = {"id": resp_id, "object": obj, "created": created, "model": self.model_name,
                    "choices": choice_list}
            if usage is None and continuous:
                usage = self._usage(req, choices)
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(c: Choice, text: str | None, finish: str | None, role: bool = False) -> dict:
            # the logprobs of the tokens whose text has gone out, this chunk's included
            lps = None if role else logprobs_delta(kind, self.facts.tokenizer, self.tokenizer_decode, c,
                                                   final=finish is not None)
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": finish}
            return {"index": c.index, "text": text or "", "logprobs": lps, "finish_reason": finish}

        async def on_update(c: Choice, done: bool) -> None:
            text = c.ready_delta(final=done)
            if text or done:
                await queue.put(chunk([piece(c, text, c.finish_reason if done else None)]))

        async def on_step(c: Choice, out) -> None:
            event = self.denoising_event(resp_id, c, out)
            await queue.put(f"data: {json.dumps(event, ensure_ascii=False)}\n\n")

        denoising = on_step if req.stream_options is not None and req.stream_options.include_denoising else None

        tasks = [asyncio.ensure_future(self._consume(c, s, on_update, denoising)) for c, s in zip(choices, streams)]

        async def run_all() -> None:
            try:
                await asyncio.gather(*tasks)
                await queue.put(None)
            except APIError as e:
                await queue.put(e)
            except Exception as e:  # noqa: BLE001 - reported to the client, then logged
                logger.exception("stream %s failed", resp_id)
                await queue.put(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

        if kind == "chat":
            for c in choices:
                yield chunk([piece(c, None, None, role=True)])
        task = asyncio.ensure_future(run_all())
        # At the drain deadline the stream ends with a "shutdown" error event and [DONE].
        forget = self.drain.on_deadline(lambda: queue.put_nowait(APIError(503, *SHUTDOWN)))
        try:
            # Events that are ready together (a step's deltas; the finishing
            # chunks, usage and [DONE]) leave in one write: the same lines,
            # fewer syscalls.
            pending: list[str] = []
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in items:
                    if item is None:
                        break
                    if isinstance(item, APIError):
                        yield "".join(pending) + f"data: {json.dumps(item.body())}\n\ndata: [DONE]\n\n"
                        return
                    pending.append(item)
                if item is None:
                    break
                if all(c.finish_reason is not None for c in choices):
                    continue  # the end follows at once: it goes with these
                yield "".join(pending)
                pending = []
            usage = self._usage(req, choices)
            self._log(resp_id, choices, usage, started)
            if req.stream_options is not None and req.stream_options.include_usage:
                pending.append(chunk([], usage))
            yield "".join(pending) + "data: [DONE]\n\n"
        finally:  # a failed or abandoned stream stops every choice, not just the first
            forget()
            task.cancel()
            for t in tasks:
                t.cancel()
