"""The server with --tensor-parallel-size 2 on CPU, end to end: it starts
its own worker process, answers through the OpenAI client with the tokens
one process gives (plain, streamed, chat, a cache mode), and when the
worker dies the engine stops: the request in flight gets an error, /health
turns 503 and the process exits non-zero."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from server.engine.llm import LLM
from tests.api.conftest import is_healthy, wait_for
from tests.conftest import REPO, make_text_checkpoint
from tests.parallel.harness import free_port

openai = pytest.importorskip("openai")

REQUESTS = [
    dict(prompt="The diffusion model", max_tokens=16, extra_body=dict(steps=8, block_length=8, seed=1)),
    dict(prompt="Hello", max_tokens=16, temperature=0.8,
         extra_body=dict(steps=16, block_length=8, seed=2, decoding="dual_cache")),
]


def spawned_workers(pid: int) -> list[int]:
    """The server's worker processes (multiprocessing spawn children)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_text_checkpoint(tmp_path_factory.mktemp("tp-server"))


def test_server_at_tp2_equals_one_process_and_dies_with_its_worker(ckpt):
    single = LLM(str(ckpt), dtype="float32", device="cpu")
    expected = []
    for r in REQUESTS:
        extra = r["extra_body"]
        params = single.default_params(gen_length=r["max_tokens"], temperature=r.get("temperature", 0.0), **extra)
        expected.append(single.generate(r["prompt"], params)[0].text)
    messages = [{"role": "user", "content": "Say something"}]
    chat_expected = single.chat(messages, single.default_params(gen_length=16, steps=8, block_length=8, seed=3))[0].text

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(ckpt), "--port", str(port),
                             "--dtype", "float32", "--device", "cpu", "--tensor-parallel-size", "2",
                             "--log-level", "warning"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: is_healthy(url), 120), "server did not start"
        workers = spawned_workers(proc.pid)
        assert len(workers) == 1
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        got = [client.completions.create(model=model, **r).choices[0].text for r in REQUESTS]
        assert got == expected
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                              extra_body=dict(steps=8, block_length=8, seed=3))
        assert chat.choices[0].message.content == chat_expected
        chunks = client.completions.create(model=model, stream=True, **REQUESTS[0])
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0]

        # A long request in flight, then the worker dies.
        lines: list[str] = []

        def stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json=dict(
                    model=model, prompt="x", max_tokens=64, steps=64, block_length=8, stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and len(lines) == 0:
                        os.kill(workers[0], signal.SIGKILL)
                    if line:
                        lines.append(line)

        t = threading.Thread(target=stream)
        t.start()
        t.join(60)
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "unavailable" and "worker" in error["message"], error
        assert proc.wait(60) == 1
        assert "tensor-parallel worker 1" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tensor_parallel_size_is_validated():
    from server.config import ModelConfig

    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ModelConfig(model="x", tensor_parallel_size=0)
    from server.__main__ import build_parser

    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])
    assert args.tensor_parallel_size == 2
