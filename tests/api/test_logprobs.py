"""Logprobs of generated tokens through the API: OpenAI's completions and
chat formats, parsed by the official client, equal to the offline engine's
numbers, one entry per returned token (stop strings included), streamed
with the text they belong to, bounds refused naming the field."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from sampler.params import DiffusionParams
from server.engine.llm import LLM
from tests.api.conftest import MODEL_NAME

DIFFUSION = {"steps": 12, "block_length": 4}


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def offline(text_ckpt):
    return LLM(str(text_ckpt), dtype="float32", device="cpu")


def reference(offline, prompt, k, seed, chat=False, max_tokens=12):
    params = DiffusionParams(gen_length=max_tokens, steps=12, block_length=4, temperature=0.8, seed=seed, logprobs=k)
    return (offline.chat(prompt, params) if chat else offline.generate(prompt, params))[0]


def test_completion_logprobs(client, offline):
    out = client.completions.create(model=MODEL_NAME, prompt="in the beginning", max_tokens=12, temperature=0.8,
                                    seed=7, logprobs=3, extra_body=DIFFUSION)
    ref = reference(offline, "in the beginning", 3, 7)
    lp = out.choices[0].logprobs
    tok = offline.tokenizer
    assert len(ref.token_ids) > 0 and out.usage.completion_tokens == len(ref.token_ids)
    assert lp.tokens == tok.token_pieces(ref.token_ids)
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    assert lp.text_offset == [len(tok.decode(ref.token_ids[:i])) for i in range(len(ref.token_ids))]
    assert len(lp.top_logprobs) == len(ref.token_ids)
    for top, x in zip(lp.top_logprobs, ref.logprobs):
        assert top == {tok.token_pieces([t])[0]: pytest.approx(v, abs=1e-5) for t, v in x.top}
        assert len(top) <= 3 and max(top.values()) >= max(lp.token_logprobs) - 100  # finite numbers
    assert all(v <= 0 for v in lp.token_logprobs)


def test_chat_logprobs(client, offline):
    messages = [{"role": "user", "content": "the earth"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0.8,
                                         seed=3, logprobs=True, top_logprobs=2, extra_body=DIFFUSION)
    ref = reference(offline, messages, 2, 3, chat=True)
    content = out.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids) == out.usage.completion_tokens
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    tok = offline.tokenizer  # special tokens are in the tokens, not in the text
    text = b"".join(bytes(c.bytes) for c, t in zip(content, ref.token_ids) if tok.decode([t]) or
                    not tok.token_pieces([t])[0]).decode("utf-8", "replace")
    assert text == out.choices[0].message.content
    for c, x in zip(content, ref.logprobs):
        assert [a.logprob for a in c.top_logprobs] == pytest.approx([v for _, v in x.top], abs=1e-5)
        assert [a.bytes for a in c.top_logprobs] == [list(b) for b in offline.tokenizer.token_bytes([t for t, _ in x.top])]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0.8,
                                           seed=3, logprobs=True, extra_body=DIFFUSION)
    assert all(c.top_logprobs == [] for c in plain.choices[0].logprobs.content)
    assert plain.choices[0].message.content == out.choices[0].message.content  # asking changes nothing
    none = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0.8,
                                          seed=3, extra_body=DIFFUSION)
    assert none.choices[0].logprobs is None


def test_streamed_logprobs_go_with_their_text(client):
    kw = dict(model=MODEL_NAME, max_tokens=16, temperature=0.9, seed=11, extra_body={"steps": 16, "block_length": 4})
    whole = client.completions.create(prompt="the earth", logprobs=2, **kw).choices[0]
    text, tokens, token_logprobs, offsets = "", [], [], []
    for chunk in client.completions.create(prompt="the earth", logprobs=2, stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                token_logprobs += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
                assert all(o <= len(text) for o in c.logprobs.text_offset)  # never ahead of the text
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_logprobs == pytest.approx(whole.logprobs.token_logprobs)

    kw_chat = dict(messages=[{"role": "user", "content": "in the"}], logprobs=True,
                   top_logprobs=1, **kw)
    whole = client.chat.completions.create(**kw_chat).choices[0]
    content, entries = "", []
    for chunk in client.chat.completions.create(stream=True, **kw_chat):
        for c in chunk.choices:
            content += c.delta.content or ""
            if c.logprobs is not None:
                entries += c.logprobs.content
    assert content == whole.message.content
    assert [(e.token, e.bytes) for e in entries] == [(e.token, e.bytes) for e in whole.logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in whole.logprobs.content])


def test_logprobs_end_with_a_stop_string(live, offline):
    ref = offline.generate("in the", DiffusionParams(gen_length=16, steps=16, block_length=4, temperature=0.9,
                                                     seed=5, ignore_eos=True))[0]
    stop = ref.text[len(ref.text) // 2:][:2]
    assert stop.strip(), "the case needs a stop string inside the answer"
    body = {"prompt": "in the", "max_tokens": 16, "steps": 16, "block_length": 4, "temperature": 0.9, "seed": 5,
            "ignore_eos": True, "stop": stop, "logprobs": 1}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
    lp, usage = r["choices"][0]["logprobs"], r["usage"]
    assert r["choices"][0]["finish_reason"] == "stop" and stop not in r["choices"][0]["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == usage["completion_tokens"] < len(ref.token_ids)
    streamed = []
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if c["logprobs"] is not None:
                        streamed += c["logprobs"]["tokens"]
    assert streamed == lp["tokens"]


@pytest.mark.parametrize("route,body,param,words", [
    ("completions", {"prompt": "in", "logprobs": 21}, "logprobs", "[0, 20]"),
    ("completions", {"prompt": "in", "logprobs": -1}, "logprobs", "[0, 20]"),
    ("completions", {"prompt": "in", "logprobs": True}, "logprobs", "integer"),
    ("completions", {"prompt": "in", "echo": True, "logprobs": 1}, "echo", "/v1/loglikelihood"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs", "[0, 20]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs",
     "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs", "bool"),
])
def test_bad_logprobs_are_refused_naming_the_field(live, route, body, param, words):
    r = httpx.post(f"{live.url}/v1/{route}", json={**body, "max_tokens": 4, "block_length": 4}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("logprobs", [0, 2])
def test_logprobs_without_a_tokenizer_is_a_400_naming_the_field(tmp_path, logprobs):
    """A checkpoint with no tokenizer cannot spell tokens: completions'
    logprobs (0 included, which still asks for the chosen token's) is a 400,
    not a 500 from spelling them later."""
    from tests.api.conftest import start_server
    from tests.conftest import make_random_checkpoint

    srv = start_server(make_random_checkpoint(tmp_path / "ckpt"))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 4,
                                                         "logprobs": logprobs}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "logprobs"
        plain = httpx.post(srv.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": [1, 2, 3],
                                                             "max_tokens": 4}, timeout=60)
        assert plain.status_code == 200, plain.text  # the same request without logprobs is served
    finally:
        srv.stop()
