"""The ``stream_options.include_denoising`` extension: one ``denoising.step``
event per denoising step, in order, before the content it makes final, its
positions and tokens adding up to exactly the answer; absent unless asked."""
from __future__ import annotations

import json

import httpx
import pytest

CHAT = {"messages": [{"role": "user", "content": "in the beginning"}], "max_tokens": 16, "steps": 16,
        "block_length": 8, "temperature": 0.7, "seed": 4}


def sse(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def is_step(e: dict) -> bool:
    return e.get("object") == "denoising.step"


def answer_of(canvas: dict[int, int], stop_ids) -> list[int]:
    """The final prefix of a canvas {position: token}: committed from 0 on, up to the first stop token."""
    ids = []
    while len(ids) in canvas and canvas[len(ids)] not in stop_ids:
        ids.append(canvas[len(ids)])
    return ids


def test_off_by_default(live):
    for options in (None, {"include_usage": True}, {"include_denoising": False}):
        body = {**CHAT, "stream": True, **({"stream_options": options} if options else {})}
        events = sse(live.url + "/v1/chat/completions", body)
        assert events and not any(is_step(e) for e in events)
        assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_events_in_order_one_per_step_and_adding_up_to_the_answer(live):
    engine = live.engine.engine
    steps_before = live.metric("llada_denoising_steps_total")
    events = sse(live.url + "/v1/chat/completions",
                 {**CHAT, "stream": True, "stream_options": {"include_denoising": True, "include_usage": True}})
    num_engine_steps = live.metric("llada_denoising_steps_total") - steps_before
    plain = httpx.post(live.url + "/v1/chat/completions", json=CHAT, timeout=60).json()
    steps = [e for e in events if is_step(e)]
    assert steps and len(steps) == num_engine_steps  # one event per denoising step of the request
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    resp_id = events[0]["id"]
    canvas: dict[int, int] = {}
    streamed = ""
    for e in events:
        assert e["id"] == resp_id
        if is_step(e):
            assert e["choice"] == 0 and e["gen_length"] == 16 and e["num_blocks"] == 2
            assert e["block_range"] == [8 * e["block"], 8 * e["block"] + 8]
            assert e["committed"], "every step commits at least one token"
            for c in e["committed"]:
                assert e["block_range"][0] <= c["position"] < e["block_range"][1]
                assert c["position"] not in canvas, "a position is committed once"
                assert 0.0 <= c["confidence"] <= 1.0
                assert c["text"] == engine.tokenizer.token_pieces([c["token"]])[0]
                canvas[c["position"]] = c["token"]
        elif e["choices"]:
            streamed += e["choices"][0]["delta"].get("content") or ""
            # text is sent only once the steps before it made it final
            assert engine.tokenizer.decode(answer_of(canvas, engine.stop_ids)).startswith(streamed)
    blocks = [e["block"] for e in steps]
    assert blocks == sorted(blocks)
    final = engine.tokenizer.decode(answer_of(canvas, engine.stop_ids))
    assert streamed == final == plain["choices"][0]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    finish = [e["choices"][0]["finish_reason"] for e in events if not is_step(e) and e["choices"]][-1]
    assert finish == plain["choices"][0]["finish_reason"]
    if finish == "length":  # no early stop: the whole canvas was committed
        assert sorted(canvas) == list(range(16))


def test_every_choice_gets_its_own_steps(live):
    body = {"prompt": ["in the", "the earth"], "n": 2, "max_tokens": 12, "steps": 6, "block_length": 4,
            "temperature": 1.0, "seed": 9, "stream": True, "stream_options": {"include_denoising": True}}
    events = sse(live.url + "/v1/completions", body)
    plain = httpx.post(live.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    engine = live.engine.engine
    for choice in range(4):
        steps = [e for e in events if is_step(e) and e["choice"] == choice]
        assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
        assert all(e["num_blocks"] == 3 and len(e["committed"]) == 2 for e in steps)  # 4 tokens over 2 steps a block
        canvas = {c["position"]: c["token"] for e in steps for c in e["committed"]}
        assert engine.tokenizer.decode(answer_of(canvas, engine.stop_ids)) == plain["choices"][choice]["text"]


def test_ragged_last_block_and_default_steps(live):
    body = {"prompt": [5, 6, 7], "max_tokens": 10, "block_length": 4, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_denoising": True}}
    steps = [e for e in sse(live.url + "/v1/completions", body) if is_step(e)]
    assert [(e["block"], tuple(e["block_range"])) for e in steps] == \
        [(0, (0, 4))] * 4 + [(1, (4, 8))] * 3 + [(2, (8, 10))] * 2
    assert all(e["gen_length"] == 10 and e["num_blocks"] == 3 for e in steps)
    # default steps = max_tokens = 10 over blocks of 4, 4, 2 -> 4, 3, 3 steps; the zero-quota step is skipped
    assert [len(e["committed"]) for e in steps] == [1, 1, 1, 1, 2, 1, 1, 1, 1]


def test_adaptive_rule_steps_add_up(live):
    """The threshold rule decides per step how many tokens to commit: the
    events still account for every committed position exactly once."""
    body = {**CHAT, "remasking": "threshold", "threshold": 0.05, "stream": True,
            "stream_options": {"include_denoising": True}}
    events = sse(live.url + "/v1/chat/completions", body)
    plain = httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    steps = [e for e in events if is_step(e)]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))
    positions = [c["position"] for e in steps for c in e["committed"]]
    assert len(positions) == len(set(positions)) and all(e["committed"] for e in steps)
    engine = live.engine.engine
    canvas = {c["position"]: c["token"] for e in steps for c in e["committed"]}
    assert engine.tokenizer.decode(answer_of(canvas, engine.stop_ids)) == plain["choices"][0]["message"]["content"]


@pytest.mark.parametrize("remasking", ["random", "low_confidence"])
def test_confidence_is_the_tokens_probability(live, remasking):
    """Each committed token's confidence is its probability under the model
    on the canvas as it stood before that step, recomputed here by a forward
    of the replayed canvas; low_confidence (greedy) commits the argmax."""
    import torch

    engine = live.engine.engine
    prompt = [5, 6, 7]
    body = {"prompt": prompt, "max_tokens": 8, "steps": 4, "block_length": 8, "temperature": 0, "seed": 2,
            "remasking": remasking, "ignore_eos": True, "stream": True, "stream_options": {"include_denoising": True}}
    steps = [e for e in sse(live.url + "/v1/completions", body) if is_step(e)]
    assert len(steps) == 4
    canvas = prompt + [engine.mask_id] * 8
    for e in steps:
        ids = torch.tensor(canvas)
        with torch.no_grad():
            logits = engine.model(ids, torch.arange(len(canvas)), [0, len(canvas)])
        probs = torch.softmax(logits.double(), -1)
        for c in e["committed"]:
            row = probs[len(prompt) + c["position"]]
            assert c["confidence"] == pytest.approx(row[c["token"]].item(), abs=2e-4)
            if remasking == "low_confidence":
                assert c["token"] == row.argmax().item()
        for c in e["committed"]:
            canvas[len(prompt) + c["position"]] = c["token"]


def test_ignored_without_stream_and_documented(live):
    r = httpx.post(live.url + "/v1/chat/completions", json={**CHAT, "stream_options": {"include_denoising": True}},
                   timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    bad = httpx.post(live.url + "/v1/chat/completions",
                     json={**CHAT, "stream": True, "stream_options": {"include_denoising": "yes"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream_options.include_denoising"
    schema = httpx.get(live.url + "/openapi.json").json()["components"]["schemas"]["StreamOptions"]
    assert "denoising.step" in schema["properties"]["include_denoising"]["description"]
