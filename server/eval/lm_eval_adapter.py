"""The lm-eval-harness model ``llada-serve``: evaluates a running llada-serve
over HTTP (importing this module registers it; needs the ``eval`` extra).

- ``generate_until`` -> ``POST /v1/completions`` (or ``/v1/chat/completions``
  when lm-eval applies a chat template), greedy unless the task says
  otherwise, the task's ``until`` strings as stops (the first 4 sent to the
  server, all of them cut here), ``max_gen_toks`` as the canvas length.
- ``loglikelihood`` -> ``POST /v1/loglikelihood``: LLaDA's Monte Carlo
  likelihood bound with ``mc_num`` samples and the greedy check, several
  pairs per HTTP request. A chat context is tokenized by the server's
  ``POST /tokenize`` (its own template) and sent as token ids.
- ``loglikelihood_rolling`` -> the bound of the whole text with an empty
  context (no chunking: a text over the model's length is an error).

Requests run ``num_concurrent`` at a time; the server batches them into its
denoising steps, so each waits for much of the others' work: ``timeout``
(seconds per HTTP request) is generous. A 429 (queue full) is retried after
its ``Retry-After``.
Extra keyword arguments (``steps``, ``block_length``, ``remasking``, ...)
go into every generation request's body as the server's diffusion fields.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

# apply_chat_template's result: the messages as JSON behind this marker, so
# the request methods know to send them to the chat route (or /tokenize).
CHAT_MARK = "\x00llada-serve-chat\x00"
MAX_STOPS = 4  # the server's limit on stop strings


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _messages(context: str) -> list[dict] | None:
    return json.loads(context[len(CHAT_MARK):]) if context.startswith(CHAT_MARK) else None


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for s in stops:
        if s:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
    return text


@register_model("llada-serve")
class LLaDAServeLM(LM):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", model: str | None = None, num_concurrent: int = 8,
                 mc_num: int = 128, pairs_per_request: int = 16, seed: int = 1234, check_greedy: bool = True,
                 max_gen_toks: int = 256, timeout: float = 3600, api_key: str | None = None, max_retries: int = 30,
                 **decoding: Any):
        super().__init__()
        self.root = _root(base_url)
        self.model = model
        self.num_concurrent = max(1, int(num_concurrent))
        self.mc_num = int(mc_num)
        self.pairs_per_request = max(1, int(pairs_per_request))
        self.seed = int(seed)
        self.check_greedy = bool(check_greedy)
        self.max_gen_toks = int(max_gen_toks)
        self.max_retries = int(max_retries)
        self.decoding = decoding  # extra body fields of generation requests
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.root, timeout=timeout, headers=headers)
        self._context_ids: dict[str, list[int]] = {}

    # -- HTTP -----------------------------------------------------------------------
    def _post(self, path: str, body: dict) -> dict:
        """POSTs and returns the JSON answer; a 429 is retried after its
        Retry-After, any other error raises with the server's message."""
        if self.model is not None:
            body = {"model": self.model, **body}
        for _ in range(self.max_retries):
            r = self.http.post(path, json=body)
            if r.status_code == 429:
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code != 200:
                raise RuntimeError(f"llada-serve {path} answered {r.status_code}: {r.text}")
            return r.json()
        raise RuntimeError(f"llada-serve {path}: still at capacity after {self.max_retries} tries")

    def _map(self, fn: Callable[[Any], Any], items: list) -> list:
        with ThreadPoolExecutor(self.num_concurrent) as pool:
            return list(pool.map(fn, items))

    # -- chat -----------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise ValueError("llada-serve: a task's gen_prefix (a prefilled assistant turn) is not supported")
        return CHAT_MARK + json.dumps(chat_history)

    @property
    def tokenizer_name(self) -> str:
        return f"llada-serve:{self.model or self.root}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "llada-serve" if chat_template else None

    def _context(self, context: str) -> str | list[int]:
        """A plain context as is; a chat one as the ids of the server's template."""
        messages = _messages(context)
        if messages is None:
            return context
        if context not in self._context_ids:
            self._context_ids[context] = self._post("/tokenize", {"messages": messages})["tokens"]
        return self._context_ids[context]

    # -- lm-eval's three request kinds -----------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def one(req) -> str:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            body = {**self.decoding, "max_tokens": int(kw.pop("max_gen_toks", self.max_gen_toks)),
                    "temperature": float(kw.pop("temperature", 0.0)), "seed": self.seed}
            stops = [s for s in until if s][:MAX_STOPS]
            if stops:
                body["stop"] = stops
            messages = _messages(context)
            if messages is None:
                out = self._post("/v1/completions", {**body, "prompt": context})
                text = out["choices"][0]["text"]
            else:
                out = self._post("/v1/chat/completions", {**body, "messages": messages})
                text = out["choices"][0]["message"]["content"] or ""
            text = cut_at_stops(text, until)
            self.cache_hook.add_partial("generate_until", req.args, text)
            return text

        return self._map(one, list(requests))

    def _likelihoods(self, pairs: list[tuple[str | list[int], str]]) -> list[dict]:
        chunks = [pairs[i:i + self.pairs_per_request] for i in range(0, len(pairs), self.pairs_per_request)]

        def one(chunk) -> list[dict]:
            body = {"requests": [{"context": c, "continuation": x} for c, x in chunk], "mc_num": self.mc_num,
                    "seed": self.seed, "check_greedy": self.check_greedy}
            return self._post("/v1/loglikelihood", body)["results"]

        return [r for results in self._map(one, chunks) for r in results]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        requests = list(requests)
        pairs = [(self._context(ctx), cont) for ctx, cont in (r.args for r in requests)]
        out = []
        for req, r in zip(requests, self._likelihoods(pairs)):
            result = (float(r["logprob"]), bool(r["is_greedy"]))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        requests = list(requests)
        results = self._likelihoods([("", r.args[0]) for r in requests])
        out = []
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(r["logprob"]))
            out.append(float(r["logprob"]))
        return out
