"""lm-eval end to end: a real ``python -m server`` (the demo model) in a
subprocess, the shipped ``llada-serve eval`` command on a few items of the
shipped local tasks (generation: reverse, exact match; multiple choice:
the reversal among 4 orderings, through /v1/loglikelihood), scores far
above chance. Plus the adapter's requests, checked against a fake server."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from lm_eval.api.instance import Instance

from server.eval.lm_eval_adapter import CHAT_MARK, LLaDAServeLM
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


def test_eval_command_scores_the_demo_tasks_far_above_chance(demo_server, tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "server", "eval", "--base-url", demo_server,
                          "--tasks", "llada_demo_reverse,llada_demo_reverse_mc", "--apply-chat-template",
                          "--limit", "6", "--mc-num", "8", "--no-greedy-check", "--output", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    # chance: exact match ~0 (any ordering of 3-8 words), multiple choice 1/4 (5+ of 6 by chance: p < 0.005)
    assert results["llada_demo_reverse"]["exact_match,none"] >= 5 / 6
    assert results["llada_demo_reverse_mc"]["acc,none"] >= 5 / 6
    assert "llada_demo_reverse_mc" in run.stdout  # lm-eval's table is printed


class FakeServer:
    """Records request bodies and answers like llada-serve (the first
    likelihood request with a 429, to check the retry)."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []
        self.refused = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        path = request.url.path
        self.bodies.append((path, body))
        if path == "/v1/loglikelihood":
            if not self.refused:
                self.refused = True
                return httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {}})
            results = [{"logprob": -float(len(p["continuation"])), "is_greedy": True, "num_tokens": 1, "stderr": 0}
                       for p in body["requests"]]
            return httpx.Response(200, json={"results": results})
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": [7, 8, 9]})
        text = "one two\nthree END four"
        if path == "/v1/chat/completions":
            return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": text}}]})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": text}]})


def fake_lm(**kw) -> tuple[LLaDAServeLM, FakeServer]:
    lm = LLaDAServeLM(base_url="http://fake/v1", **kw)
    fake = FakeServer()
    lm.http = httpx.Client(base_url=lm.root, transport=httpx.MockTransport(fake))
    return lm, fake


def inst(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_generation_requests():
    lm, fake = fake_lm(steps=16, block_length=4, model="m")
    chat = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    until = ["\n", "A", "B", "C", "END"]
    outs = lm.generate_until([inst("generate_until", ("prompt", {"until": until, "max_gen_toks": 12})),
                              inst("generate_until", (chat, {"until": "END"}))])
    assert outs == ["one two", "one two\nthree "]  # every until string cut, the 5th too
    (p1, b1), (p2, b2) = sorted(fake.bodies, key=lambda x: x[0])
    assert p1 == "/v1/chat/completions" and b1["messages"] == [{"role": "user", "content": "hi"}]
    assert b1["stop"] == ["END"] and b1["max_tokens"] == 256
    assert p2 == "/v1/completions" and b2["prompt"] == "prompt" and b2["stop"] == until[:4]
    assert b2["max_tokens"] == 12 and b2["temperature"] == 0 and (b2["steps"], b2["block_length"]) == (16, 4)
    assert b2["model"] == "m"


def test_likelihood_requests_batched_in_order_and_retried():
    lm, fake = fake_lm(pairs_per_request=2, mc_num=32, check_greedy=False)
    chat = lm.apply_chat_template([{"role": "user", "content": "q"}])
    reqs = [inst("loglikelihood", ("ctx", " a")), inst("loglikelihood", (chat, "bbb")),
            inst("loglikelihood", ("ctx", "cc"))]
    assert lm.loglikelihood(reqs) == [(-2.0, True), (-3.0, True), (-2.0, True)]
    ll = [b for p, b in fake.bodies if p == "/v1/loglikelihood"]
    assert sum(len(b["requests"]) for b in ll) == 3 + 2  # the refused chunk was sent again
    assert all(b["mc_num"] == 32 and b["check_greedy"] is False for b in ll)
    sent = {json.dumps(p["context"]) for b in ll for p in b["requests"]}
    assert json.dumps([7, 8, 9]) in sent  # the chat context as the server's template ids
    assert [p for p, _ in fake.bodies].count("/tokenize") == 1
    assert lm.loglikelihood_rolling([inst("loglikelihood_rolling", ("whole text",))]) == [-10.0]
    assert chat.startswith(CHAT_MARK)
