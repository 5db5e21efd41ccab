"""Bad input gets the right status and the OpenAI error envelope, and the
server keeps serving."""
from __future__ import annotations

import httpx
import pytest

from server.config import ServerConfig
from tests.api.conftest import start_server

OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "block_length": 4}
OK_COMP = {"prompt": "in the", "max_tokens": 4, "block_length": 4}

# (name, route, body or raw bytes, status, param)
CASES = [
    ("max_tokens wrong type", "completions", {**OK_COMP, "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens negative", "completions", {**OK_COMP, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens zero", "chat", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", "completions", {**OK_COMP, "max_tokens": 10**6}, 400, "max_tokens"),
    ("max_completion_tokens bad", "chat", {**OK_CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("max_tokens bool", "completions", {**OK_COMP, "max_tokens": True}, 400, "max_tokens"),
    ("no prompt", "completions", {"max_tokens": 4}, 400, "prompt"),
    ("empty prompt list", "completions", {**OK_COMP, "prompt": []}, 400, "prompt"),
    ("empty token-id prompt", "completions", {**OK_COMP, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("prompt token out of vocab", "completions", {**OK_COMP, "prompt": [1, 10**7]}, 400, "prompt"),
    ("prompt wrong type", "completions", {**OK_COMP, "prompt": {"a": 1}}, 400, "prompt"),
    ("empty messages", "chat", {**OK_CHAT, "messages": []}, 400, "messages"),
    ("unknown role", "chat", {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("content wrong type", "chat", {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("messages not a list", "chat", {**OK_CHAT, "messages": "hi"}, 400, "messages"),
    ("unknown remasking", "chat", {**OK_CHAT, "remasking": "lowest"}, 400, "remasking"),
    ("steps zero", "chat", {**OK_CHAT, "steps": 0}, 400, "steps"),
    ("steps fewer than blocks", "completions", {**OK_COMP, "max_tokens": 16, "block_length": 2, "steps": 3}, 400, "steps"),
    ("block_length zero", "completions", {**OK_COMP, "block_length": 0}, 400, "block_length"),
    ("negative temperature", "chat", {**OK_CHAT, "temperature": -1}, 400, "temperature"),
    ("top_p zero", "chat", {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    ("top_k below -1", "chat", {**OK_CHAT, "top_k": -2}, 400, "top_k"),
    ("top_k overflowing int64", "chat", {**OK_CHAT, "top_k": 2**63, "temperature": 1}, 400, "top_k"),
    ("negative cfg_scale", "chat", {**OK_CHAT, "cfg_scale": -0.5}, 400, "cfg_scale"),
    ("unknown decoding", "chat", {**OK_CHAT, "decoding": "turbo"}, 400, "decoding"),
    ("threshold out of range", "chat", {**OK_CHAT, "remasking": "threshold", "threshold": 1.5}, 400, "threshold"),
    ("factor not positive", "completions", {**OK_COMP, "remasking": "factor", "factor": 0}, 400, "factor"),
    ("guidance with a cache mode", "chat", {**OK_CHAT, "decoding": "dual_cache", "cfg_scale": 1}, 400, "cfg_scale"),
    ("n zero", "chat", {**OK_CHAT, "n": 0}, 400, "n"),
    ("n too many", "completions", {**OK_COMP, "n": 100}, 400, "n"),
    ("stop too many", "chat", {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop empty string", "completions", {**OK_COMP, "stop": ""}, 400, "stop"),
    ("stop list with an empty string", "chat", {**OK_CHAT, "stop": ["x", ""]}, 400, "stop"),
    ("max_completion_tokens over the model length", "chat", {**OK_CHAT, "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens"),
    ("max_completion_tokens over blocks", "chat", {**OK_CHAT, "max_completion_tokens": 16, "block_length": 2,
                                                   "steps": 3}, 400, "steps"),
    ("stream not bool", "chat", {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    ("seed not int", "chat", {**OK_CHAT, "seed": "abc"}, 400, "seed"),
    ("logprobs over 20", "completions", {**OK_COMP, "logprobs": 21}, 400, "logprobs"),
    ("echo unsupported", "completions", {**OK_COMP, "echo": True}, 400, "echo"),
    ("tools unsupported", "chat", {**OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown model", "chat", {**OK_CHAT, "model": "gpt-4"}, 404, "model"),
    ("invalid json", "chat", b'{"messages": [', 400, "body"),
    ("json not an object", "chat", b'[1, 2, 3]', 400, "body"),
    ("json a string", "completions", b'"hi"', 400, "body"),
    # Strict types: a boolean or a string is not a number; numbers are finite.
    *[(f"{field} {value!r}", "completions", {**OK_COMP, field: value}, 400, field)
      for field in ("temperature", "top_p", "top_k", "cfg_scale", "threshold", "factor", "presence_penalty",
                    "frequency_penalty")
      for value in (True, "1")],
    ("top_k a float", "completions", {**OK_COMP, "top_k": 1.5}, 400, "top_k"),
    ("logit_bias value a string", "completions", {**OK_COMP, "logit_bias": {"5": "1"}}, 400, "logit_bias"),
    *[(f"{field} {literal}", "completions", b'{"prompt": "in the", "max_tokens": 4, "%s": %s}' % (
        field.encode(), literal.encode()), 400, field)
      for field in ("temperature", "top_p", "cfg_scale", "threshold", "factor")
      for literal in ("Infinity", "NaN", "-Infinity", "1e999")],
    # Lone surrogates (valid JSON escapes, not text) anywhere: a 400 naming where, never a 500.
    ("surrogate prompt", "completions", b'{"prompt": "\\ud800", "max_tokens": 4}', 400, "prompt"),
    ("surrogate in a prompt list", "completions", b'{"prompt": ["a", "x\\udfff"], "max_tokens": 4}', 400,
     "prompt[1]"),
    ("surrogate model", "completions", b'{"model": "\\ud800", "prompt": "a", "max_tokens": 4}', 400, "model"),
    ("surrogate chat model", "chat", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "a"}]}', 400,
     "model"),
    ("surrogate message", "chat", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages[0].content"),
    ("surrogate text part", "chat",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', 400,
     "messages[0].content[0].text"),
    ("surrogate stop", "chat", b'{"messages": [{"role": "user", "content": "a"}], "stop": ["\\ud800"]}', 400,
     "stop[0]"),
    ("surrogate user", "chat", b'{"messages": [{"role": "user", "content": "a"}], "user": "\\ud800"}', 400, "user"),
    ("surrogate unknown field", "completions", b'{"prompt": "a", "frob": {"x": "\\ud800"}}', 400, "frob.x"),
    ("surrogate unknown key", "completions", b'{"prompt": "a", "\\ud800": 1}', 400, "body"),
    ("surrogate tokenize prompt", "tokenize", b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("surrogate tokenize model", "tokenize", b'{"model": "\\ud800", "prompt": "a"}', 400, "model"),
    ("surrogate tokenize messages", "tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content"),
    ("surrogate detokenize model", "detokenize", b'{"model": "\\ud800", "tokens": [5]}', 400, "model"),
    ("detokenize unknown model", "detokenize", {"model": "gpt-4", "tokens": [5]}, 404, "model"),
    ("tokenize unknown model", "tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("tokenize add_special_tokens not bool", "tokenize", {"prompt": "a", "add_special_tokens": 1}, 400,
     "add_special_tokens"),
    ("ignore_eos not bool", "completions", {**OK_COMP, "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("continuous_usage_stats not bool", "chat", {**OK_CHAT, "stream": True,
                                                 "stream_options": {"continuous_usage_stats": 1}}, 400,
     "stream_options.continuous_usage_stats"),
    ("oversized body", "completions", {**OK_COMP, "prompt": "x" * (2 << 20)}, 413, None),
]


ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "tokenize": "/tokenize",
          "detokenize": "/detokenize"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(live, case):
    _, route, body, status, param = case
    url = live.url + ROUTES[route]
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert not err["message"].startswith("Value error"), err
    if param is not None:
        assert err["param"] == param, err
    if case[0].startswith(("json", "invalid json")):
        assert "must be a JSON object" in err["message"]


def test_still_serving_after_bad_requests(live):
    for _, route, body, _, _ in CASES[:5]:
        httpx.post(live.url + "/v1/completions", json=body)
    r = httpx.post(live.url + "/v1/chat/completions", json=OK_CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_fields_are_ignored(live):
    r = httpx.post(live.url + "/v1/chat/completions", json={**OK_CHAT, "frobnicate": 3, "user": "u1"})
    assert r.status_code == 200


def test_unknown_route_and_method(live):
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(live.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_request_id_is_echoed(live):
    r = httpx.get(live.url + "/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    ids = {httpx.get(live.url + "/live").headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)  # a fresh one per request
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**OK_CHAT, "stream": True},
                      headers={"X-Request-Id": "stream-7"}) as r:
        assert r.headers["x-request-id"] == "stream-7" and len(r.headers.get_list("x-request-id")) == 1
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    r = httpx.post(live.url + "/v1/completions", json={**OK_COMP, "prompt": "x" * (2 << 20)},
                   headers={"X-Request-Id": "too-big"})
    assert r.status_code == 413 and r.headers["x-request-id"] == "too-big"


def test_operational_routes(live):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/live").status_code == 200
    from server import __version__
    assert httpx.get(live.url + "/version").json() == {"version": __version__}
    tok = httpx.post(live.url + "/tokenize", json={"prompt": "in the beginning"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    back = httpx.post(live.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == "in the beginning"
    chat = httpx.post(live.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > tok["count"] - 3
    r = httpx.post(live.url + "/detokenize", json={"tokens": [10**8]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    assert httpx.post(live.url + "/tokenize", json={}).status_code == 400


def test_api_key(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(api_key="s3cret"))
    try:
        url = srv.url + "/v1/chat/completions"
        r = httpx.post(url, json=OK_CHAT)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(url, json=OK_CHAT, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.post(url, json=OK_CHAT, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        for open_route in ("/health", "/live", "/metrics"):
            assert httpx.get(srv.url + open_route).status_code == 200
    finally:
        srv.stop()


def test_chunked_oversized_body_gets_413(live):
    def chunks():
        for _ in range(3):
            yield b" " * (600 << 10)  # 1.8 MB in all, no Content-Length

    r = httpx.post(live.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = iter([b'{"prompt": [5, 6], ', b'"max_tokens": 4, "block_length": 4}'])
    r = httpx.post(live.url + "/v1/completions", content=small, headers={"content-type": "application/json"})
    assert r.status_code == 200  # a chunked body under the limit reaches the route intact


def test_absurd_step_counts_cost_nothing(live):
    """Steps far beyond the canvas only add empty steps, skipped in O(1)."""
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "block_length": 4}
    base = httpx.post(live.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    r = httpx.post(live.url + "/v1/completions", json={**body, "steps": 10**12}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == base
