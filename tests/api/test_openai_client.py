"""The official openai client against a live server: completions and chat,
plain and streamed, equal to the offline LLM for the same prompt and seed."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from tests.api.conftest import MODEL_NAME


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def offline(text_ckpt):
    return LLM(str(text_ckpt), dtype="float32", device="cpu")


DIFFUSION = {"steps": 12, "block_length": 4}


def params(max_tokens, seed, temperature=0.8, **kw) -> DiffusionParams:
    return DiffusionParams(gen_length=max_tokens, steps=12, block_length=4, temperature=temperature, seed=seed, **kw)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_equals_offline(client, offline):
    out = client.completions.create(model=MODEL_NAME, prompt="in the beginning", max_tokens=12, temperature=0.8,
                                    seed=7, extra_body=DIFFUSION)
    ref = offline.generate("in the beginning", params(12, 7))[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_equals_offline(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the earth"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0.8,
                                         seed=3, extra_body=DIFFUSION)
    ref = offline.chat(messages, params(12, 3))[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids)


def test_streamed_chat_equals_offline(client, offline):
    messages = [{"role": "user", "content": "in the beginning"}]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0.8,
                                            seed=5, stream=True, stream_options={"include_usage": True},
                                            extra_body=DIFFUSION)
    chunks = list(stream)
    ref = offline.chat(messages, params(12, 5))[0]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == ref.text
    assert content[-1].choices[0].finish_reason == ref.finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_streamed_completion_raw_sse(live, offline):
    """The wire format: data: lines, text deltas in order, [DONE] last."""
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 16, "temperature": 0, "block_length": 4, "steps": 16, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    ref = offline.generate([[5, 6, 7, 8]], DiffusionParams(gen_length=16, steps=16, block_length=4))[0]
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text
    assert events[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert "usage" not in events[-1]


def test_events_ready_together_leave_in_one_write(live):
    """The finishing chunk, the usage chunk and [DONE] are one HTTP chunk
    (one write), read here off the wire with its chunked framing intact."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(live.url)
    data = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 8, "block_length": 4, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    pieces = []
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        pieces.append(body[:size].decode())
        body = body[size + 2:]
    pieces = [p for p in pieces if p]
    last = pieces[-1]
    assert last.endswith("data: [DONE]\n\n") and '"usage"' in last and '"finish_reason": "' in last
    assert "".join(pieces).count("data: ") == sum(p.count("data: ") for p in pieces)  # nothing lost


def test_n_and_prompt_lists(client, offline):
    out = client.completions.create(model=MODEL_NAME, prompt=["in the", "the earth"], n=2, max_tokens=8,
                                    temperature=1.0, seed=11, extra_body={"steps": 8, "block_length": 4})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        prompt = ["in the", "the earth"][c.index // 2]
        ref = offline.generate(prompt, DiffusionParams(gen_length=8, steps=8, block_length=4, temperature=1.0,
                                                       seed=11 + c.index))[0]
        assert c.text == ref.text
    assert out.usage.prompt_tokens == len(offline.tokenizer.encode("in the")) + len(offline.tokenizer.encode("the earth"))


def test_stop_string_cuts_the_answer(client, offline):
    ref = offline.generate([5, 6, 7], DiffusionParams(gen_length=16, steps=16, block_length=4))[0]
    text = ref.text
    stop = next((text[i:i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2]), None)
    assert stop is not None, "the reference answer is too short for this test"
    out = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"steps": 16, "block_length": 4})
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    # Billed: the fewest tokens whose text covers the returned text.
    tok = offline.tokenizer
    k = next(k for k in range(len(ref.token_ids) + 1) if len(tok.decode(ref.token_ids[:k])) >= len(out.choices[0].text))
    assert out.usage.completion_tokens == k
    streamed = client.completions.create(model=MODEL_NAME, prompt=[5, 6, 7], max_tokens=16, temperature=0,
                                         stop=[stop], stream=True, extra_body={"steps": 16, "block_length": 4})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text  # no stop text leaks
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_batch_invariance_16_concurrent_streams(live, offline):
    """16 concurrent streamed requests, all different, each equal to itself alone."""
    reqs = [{"prompt": [5 + i, 6, 7 + i % 3], "max_tokens": 8 + (i % 4) * 4, "temperature": [0, 0.7, 1.3][i % 3],
             "seed": 100 + i, "block_length": [4, 8][i % 2], "steps": 8 + (i % 4) * 4,
             "remasking": ["low_confidence", "random"][i % 2], "stream": True} for i in range(16)]

    async def one(client, body):
        text = ""
        async with client.stream("POST", live.url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_of():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, b) for b in reqs))

    batched_before = live.metric("llada_batch_size_count") - live.metric('llada_batch_size_bucket{le="1.0"')
    together = asyncio.run(all_of())
    # They really shared forward passes.
    assert live.metric("llada_batch_size_count") - live.metric('llada_batch_size_bucket{le="1.0"') > batched_before
    for body, text in zip(reqs, together):
        ref = offline.generate([body["prompt"]], DiffusionParams(
            gen_length=body["max_tokens"], steps=body["steps"], block_length=body["block_length"],
            temperature=body["temperature"], seed=body["seed"], remasking=body["remasking"]))[0]
        assert text == ref.text


@pytest.mark.parametrize("knobs", [{"decoding": "dual_cache", "remasking": "threshold", "threshold": 0.5},
                                   {"decoding": "prefix_cache", "remasking": "factor", "factor": 2.0}])
def test_acceleration_knobs_equal_offline(client, offline, knobs):
    out = client.completions.create(model=MODEL_NAME, prompt="in the beginning", max_tokens=16, seed=1,
                                    extra_body={"block_length": 8, **knobs})
    ref = offline.generate("in the beginning", DiffusionParams(gen_length=16, block_length=8, seed=1, **knobs))[0]
    assert out.choices[0].text == ref.text
