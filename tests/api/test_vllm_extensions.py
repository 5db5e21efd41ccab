"""vLLM's request extensions that clients send: ignore_eos, add_special_tokens
(/tokenize and /v1/completions), stream_options.continuous_usage_stats."""
from __future__ import annotations

import json
from pathlib import Path

import httpx


def stream_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def canvas_of(events: list[dict], gen_length: int) -> list[int | None]:
    """The generated part rebuilt from the denoising events (None: never committed)."""
    canvas = [None] * gen_length
    for e in events:
        if e.get("object") == "denoising.step":
            for c in e["committed"]:
                assert canvas[c["position"]] is None
                canvas[c["position"]] = c["token"]
    return canvas


def answer(events: list[dict]) -> tuple[str, dict, str]:
    chunks = [e for e in events if e.get("object") == "text_completion"]
    text = "".join(c["text"] for e in chunks for c in e["choices"])
    finish = [c["finish_reason"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    return text, chunks[-1]["usage"], finish[0]


def test_ignore_eos_returns_the_whole_canvas(live, monkeypatch):
    """A canvas token made an end token: without ignore_eos the answer stops
    before the first end token; with it the same canvas is the whole answer,
    end tokens decoded like any other token."""
    engine = live.engine.engine
    tok, n = engine.tokenizer, 16
    body = {"prompt": "hello", "max_tokens": n, "block_length": 8, "temperature": 1.0, "seed": 3,
            "stream_options": {"include_denoising": True, "include_usage": True}}
    canvas = canvas_of(stream_events(live.url, {**body, "ignore_eos": True}), n)
    assert None not in canvas
    ends = frozenset(engine.stop_ids | {canvas[n // 2]})
    first_end = next(i for i, t in enumerate(canvas) if t in ends)
    monkeypatch.setattr(engine, "stop_ids", ends)

    events = stream_events(live.url, body)
    partial = canvas_of(events, n)
    assert all(t is None or t == c for t, c in zip(partial, canvas))  # the same denoising, maybe stopped early
    text, usage, finish = answer(events)
    assert (text, usage["completion_tokens"], finish) == (tok.decode(canvas[:first_end]), first_end, "stop")
    kept = stream_events(live.url, {**body, "ignore_eos": True})
    assert canvas_of(kept, n) == canvas
    text, usage, finish = answer(kept)
    assert (text, usage["completion_tokens"], finish) == (tok.decode(canvas), n, "length")


def test_add_special_tokens_on_tokenize_and_completions(live):
    """Both routes encode as the tokenizer does with the flag given (the
    test tokenizer adds no BOS itself, so the two encodings may agree)."""
    tok = live.engine.engine.tokenizer
    for special in (True, False):
        expected = tok.hf("hello world", add_special_tokens=special)["input_ids"]
        got = httpx.post(live.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": special})
        assert got.json()["tokens"] == expected
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 4,
                                                           "add_special_tokens": special}, timeout=60)
        assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_continuous_usage_stats_puts_usage_on_every_chunk(live):
    body = {"prompt": "hello", "max_tokens": 16, "block_length": 4, "steps": 16,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = stream_events(live.url, body)
    assert len(events) > 2 and all("usage" in e for e in events)
    prompt = events[-1]["usage"]["prompt_tokens"]
    done = [e["usage"]["completion_tokens"] for e in events]
    assert done == sorted(done) and all(e["usage"]["prompt_tokens"] == prompt for e in events)
    assert all(e["usage"]["total_tokens"] == prompt + e["usage"]["completion_tokens"] for e in events)
    assert events[-1]["choices"] == [] and done[-1] == done[-2]  # the final usage chunk agrees
    plain = stream_events(live.url, {**body, "stream_options": {"include_usage": True}})
    assert [("usage" in e) for e in plain] == [False] * (len(plain) - 1) + [True]


def test_add_special_tokens_changes_the_prompt_where_the_tokenizer_adds_bos():
    """On the bundled demo, whose tokenizer puts BOS first, the flag decides
    whether BOS is in the prompt: a server that ignored it would count the
    same prompt tokens both ways."""
    from server.__main__ import bundled_model
    from tests.api.conftest import start_server

    srv = start_server(Path(bundled_model()))
    try:
        bos = srv.engine.facts.tokenizer.hf.bos_token_id
        tokens, counted = {}, {}
        for special in (True, False):
            tokens[special] = httpx.post(srv.url + "/tokenize", json={"prompt": "hello world",
                                                                     "add_special_tokens": special}).json()["tokens"]
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 8,
                                                              "add_special_tokens": special}, timeout=60)
            assert r.status_code == 200, r.text
            counted[special] = r.json()["usage"]["prompt_tokens"]
        assert bos is not None and tokens[True] == [bos, *tokens[False]] and bos not in tokens[False]
        assert counted == {True: len(tokens[True]), False: len(tokens[False])}
        default = httpx.post(srv.url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
        assert default == tokens[True]  # the default adds them, as vLLM's completions do
    finally:
        srv.stop()
