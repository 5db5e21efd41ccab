"""Locust load for llada-serve: a mix of streamed and non-streamed chat and
completions with varied lengths and diffusion settings. Every response is
validated (status, envelope, SSE order, [DONE], usage against the text);
TTFT, time per output token and end-to-end latency are recorded as custom
events ("TTFT", "TPOT", "E2E"). Run it as its own process (locust patches the process with gevent):

    locust -f benchmarks/locustfile.py --headless -u 32 -r 8 --run-time 10m --host http://127.0.0.1:8000

or through ``benchmarks/load.py``, which starts the server and collects the
figures.
"""
from __future__ import annotations

import json
import random
import time

from locust import HttpUser, between, task

PROMPTS = ["reverse: apple banana cherry", "sort: 9 2 7 4", "add: 123 + 456", "continue: In the beginning God",
           "reverse: one two three four five six", "sort: 5 3 8 1", "add: 47 + 385", "Tell me about the sea."]
SETTINGS = [
    {"max_tokens": 16, "block_length": 8},
    {"max_tokens": 32, "block_length": 8, "temperature": 0.7},
    {"max_tokens": 24, "block_length": 4, "remasking": "random"},
    {"max_tokens": 32, "block_length": 16, "steps": 16},
    {"max_tokens": 32, "block_length": 8, "remasking": "threshold", "threshold": 0.8},
    {"max_tokens": 32, "block_length": 8, "decoding": "dual_cache", "remasking": "threshold"},
]


class Invalid(Exception):
    """A response that broke the protocol."""


def check_usage(usage: dict, text: str) -> None:
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        raise Invalid(f"usage does not add up: {usage}")
    if (usage["completion_tokens"] == 0) != (text == ""):
        raise Invalid(f"usage {usage['completion_tokens']} tokens for text {text!r}")


class DiffusionUser(HttpUser):
    wait_time = between(0.05, 0.5)

    def body(self, chat: bool, stream: bool) -> dict:
        body = dict(random.choice(SETTINGS), stream=stream, seed=random.randrange(1 << 30))
        prompt = random.choice(PROMPTS)
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def fire(self, name: str, value_ms: float) -> None:
        self.environment.events.request.fire(request_type="METRIC", name=name, response_time=value_ms,
                                             response_length=0, exception=None, context={})

    @task(3)
    def chat_stream(self) -> None:
        self.streamed("/v1/chat/completions", chat=True)

    @task(2)
    def completion_stream(self) -> None:
        self.streamed("/v1/completions", chat=False)

    @task(2)
    def chat(self) -> None:
        self.plain("/v1/chat/completions", chat=True)

    @task(1)
    def completion(self) -> None:
        self.plain("/v1/completions", chat=False)

    def plain(self, path: str, chat: bool) -> None:
        with self.client.post(path, json=self.body(chat, False), name=path, catch_response=True) as r:
            try:
                if r.status_code != 200:
                    raise Invalid(f"HTTP {r.status_code}: {r.text[:200]}")
                data = r.json()
                obj = "chat.completion" if chat else "text_completion"
                if data.get("object") != obj or not data["id"].startswith("chatcmpl-" if chat else "cmpl-"):
                    raise Invalid(f"bad envelope: {data}")
                choice = data["choices"][0]
                text = choice["message"]["content"] if chat else choice["text"]
                if choice["finish_reason"] not in ("stop", "length"):
                    raise Invalid(f"finish_reason {choice['finish_reason']}")
                check_usage(data["usage"], text)
                self.fire("E2E", r.request_meta["response_time"])
                r.success()
            except (Invalid, KeyError, ValueError) as e:
                r.failure(str(e))

    def streamed(self, path: str, chat: bool) -> None:
        t0 = time.perf_counter()
        with self.client.post(path, json=self.body(chat, True), stream=True, catch_response=True,
                              name=path + " (stream)") as r:
            try:
                if r.status_code != 200:
                    raise Invalid(f"HTTP {r.status_code}")
                text, finish, usage, ttft, done, first = "", None, None, None, False, True
                for raw in r.iter_lines():
                    line = raw.decode() if isinstance(raw, bytes) else raw
                    if not line:
                        continue
                    if done:
                        raise Invalid("data after [DONE]")
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        raise Invalid(f"stream error: {event['error']}")
                    if event.get("usage"):
                        usage = event["usage"]
                        continue
                    choice = event["choices"][0]
                    if finish is not None:
                        raise Invalid("content after finish_reason")
                    piece = choice["delta"].get("content") if chat else choice["text"]
                    if chat and first and choice["delta"].get("role") != "assistant":
                        raise Invalid("first chat chunk has no role")
                    first = False
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
                    text += piece or ""
                    finish = choice["finish_reason"]
                if not done or finish is None or usage is None:
                    raise Invalid(f"incomplete stream (done={done}, finish={finish}, usage={usage is not None})")
                check_usage(usage, text)
                e2e = time.perf_counter() - t0
                self.fire("E2E", e2e * 1000)
                if ttft is not None:
                    self.fire("TTFT", ttft * 1000)
                    if usage["completion_tokens"] > 1:
                        self.fire("TPOT", (e2e - ttft) * 1000 / (usage["completion_tokens"] - 1))
                r.success()
            except (Invalid, KeyError, ValueError) as e:
                r.failure(str(e))
