"""Faults: disconnects free their slot, overload answers 429 and nothing
hangs, one failing request fails alone, a dead engine turns /health 503,
SIGTERM drains in-flight requests and exits 0."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from server.config import SchedulerConfig, ServerConfig
from tests.api.conftest import is_healthy, start_server, wait_for
from tests.conftest import REPO

LONG = {"prompt": [5, 6, 7], "max_tokens": 192, "steps": 192, "block_length": 32, "stream": True}


def test_disconnect_mid_stream_frees_the_request(live):
    steps_before = live.metric("llada_denoising_steps_total")
    with httpx.stream("POST", live.url + "/v1/completions", json=LONG) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one event, then hang up
    assert wait_for(lambda: live.metric("llada_num_requests_running") == 0)
    assert wait_for(lambda: not live.engine.engine.scheduler.running)
    settled = live.metric("llada_denoising_steps_total")
    time.sleep(0.3)
    assert live.metric("llada_denoising_steps_total") == settled  # no more steps for it
    assert settled - steps_before < 192  # it was stopped well before its canvas was done
    assert live.metric('llada_request_success_total{finished_reason="abort"') >= 1


def test_disconnects_at_random_points_leak_nothing(live):
    """Streams of every decoding mode dropped after 0..6 events: the gauges
    return to 0, the batch empties and every KV page is back in the pool."""
    pages = live.engine.engine.scheduler.pages
    rng = __import__("random").Random(0)
    for i in range(8):
        body = {**LONG, "max_tokens": 96, "steps": 96, "decoding": ["exact", "prefix_cache", "dual_cache"][i % 3],
                "seed": i}
        with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            stop_after, seen = rng.randrange(0, 7), 0
            for line in r.iter_lines():
                if seen >= stop_after:
                    break
                seen += line.startswith("data: {")
    assert wait_for(lambda: live.metric("llada_num_requests_running") == 0
                    and live.metric("llada_num_requests_waiting") == 0)
    assert wait_for(lambda: not live.engine.engine.scheduler.running and pages.num_free == pages.num_pages)
    assert wait_for(lambda: not live.engine._streams and not live.engine._requests)
    assert wait_for(lambda: live.state.in_flight == 0)


def test_slow_reader_does_not_block_others(live):
    """A client that opens a stream and never reads it holds nothing up."""
    sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])))
    body = json.dumps({**LONG, "max_tokens": 128, "steps": 128}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        t0 = time.monotonic()
        for i in range(4):
            r = httpx.post(live.url + "/v1/completions",
                           json={"prompt": [5, 6 + i], "max_tokens": 16, "block_length": 8}, timeout=30)
            assert r.status_code == 200
        assert time.monotonic() - t0 < 30
    finally:
        sock.close()
    assert wait_for(lambda: live.metric("llada_num_requests_running") == 0)


def test_overload_gets_429_and_nothing_hangs(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(max_queued_requests=2), SchedulerConfig(max_num_seqs=1))
    body = {"prompt": [5, 6, 7], "max_tokens": 32, "steps": 32, "block_length": 8}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=body) for _ in range(8)))

    try:
        t0 = time.monotonic()
        responses = asyncio.run(asyncio.wait_for(burst(), 60))
        assert time.monotonic() - t0 < 60
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"

        async def stream_burst():  # overload is a real 429 for streams too, not an error inside a 200
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json={**body, "stream": True})
                                              for _ in range(8)))

        streamed = asyncio.run(asyncio.wait_for(stream_burst(), 60))
        assert 429 in [r.status_code for r in streamed]
        assert all("data: [DONE]" in r.text for r in streamed if r.status_code == 200)
        assert wait_for(lambda: srv.metric("llada_num_requests_waiting") == 0
                        and srv.metric("llada_num_requests_running") == 0)
    finally:
        srv.stop()


def test_one_failing_request_fails_alone(live, monkeypatch):
    runner = live.engine.engine.runner
    real = runner.execute
    POISON = 13

    def execute(sched):
        if any(s.canvas[0] == POISON for s in sched.seqs):
            raise RuntimeError("injected fault")
        return real(sched)

    monkeypatch.setattr(runner, "execute", execute)
    body = {"max_tokens": 16, "steps": 16, "block_length": 8, "temperature": 0.5}

    async def mixed():
        async with httpx.AsyncClient(timeout=60) as client:
            good = [client.post(live.url + "/v1/completions", json={**body, "prompt": [20 + i, 6], "seed": i})
                    for i in range(8)]
            bad = client.post(live.url + "/v1/completions", json={**body, "prompt": [POISON, 6]})
            return await asyncio.gather(bad, *good)

    bad, *good = asyncio.run(mixed())
    assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
    assert [r.status_code for r in good] == [200] * 8
    assert live.metric('llada_request_success_total{finished_reason="error"') >= 1
    monkeypatch.undo()
    assert httpx.post(live.url + "/v1/completions", json={**body, "prompt": [POISON, 6]}).status_code == 200


def test_dead_engine_turns_health_503(text_ckpt):
    srv = start_server(text_ckpt)
    fatal = []
    srv.engine.on_fatal = fatal.append
    try:
        def broken(result):
            raise RuntimeError("scheduler bug")

        srv.engine.engine.scheduler.update = broken
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5], "max_tokens": 4, "block_length": 4})
        assert r.status_code == 503 and "engine loop has stopped: scheduler bug" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        assert len(fatal) == 1
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": [5], "max_tokens": 4}).status_code == 503
    finally:
        srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_under_load_drains_then_exits_zero(text_ckpt):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # One intra-op thread: the model is tiny, and OpenMP spinning against a busy core can slow it 100x.
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(text_ckpt), "--port", str(port),
                             "--drain-timeout", "120", "--log-level", "warning"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: is_healthy(url), 90), "server did not start"
        async def in_flight():
            async with httpx.AsyncClient(timeout=60) as client:
                async def plain(i):
                    return await client.post(url + "/v1/completions", json={**LONG, "stream": False, "seed": i})

                async def streamed():
                    async with client.stream("POST", url + "/v1/completions", json=LONG) as r:
                        lines = []
                        async for line in r.aiter_lines():
                            if line.startswith("data: {") and len(lines) == 0:
                                proc.send_signal(signal.SIGTERM)  # mid-stream, with 3 more in flight
                            if line:
                                lines.append(line)
                        return lines

                return await asyncio.gather(streamed(), *(plain(i) for i in range(3)))

        async def late_request():
            await asyncio.sleep(0)
            while True:
                async with httpx.AsyncClient() as client:
                    if (await client.get(url + "/health")).status_code == 503:
                        return await client.post(url + "/v1/completions", json={"prompt": [5], "max_tokens": 4})
                await asyncio.sleep(0.01)

        async def scenario():
            return await asyncio.gather(in_flight(), late_request())

        (stream_lines, *plain), late = asyncio.run(scenario())
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        assert stream_lines[-1] == "data: [DONE]"
        events = [json.loads(l[6:]) for l in stream_lines if l.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert [r.status_code for r in plain] == [200] * 3
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_model_that_fails_to_load_exits_nonzero(tmp_path):
    """The engine thread dies while loading: the process exits 1, saying why."""
    (tmp_path / "config.json").write_text('{"architectures": ["LLaDAModelLM"]}')
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path), "--port", str(_free_port()),
                           "--log-level", "warning"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "missing field(s) d_model" in proc.stderr


CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


def test_a_device_fault_fails_everything_in_flight(text_ckpt):
    """A CUDA error in the model's forward: the streamed request gets an
    error event then [DONE], the plain one a 503 envelope, /health turns 503,
    new requests get 503, the metrics count it and on_fatal is called."""
    import threading

    import torch

    srv = start_server(text_ckpt)
    fatal = []
    srv.engine.on_fatal = fatal.append
    model = srv.engine.engine.runner.model
    real, armed = model.forward, threading.Event()

    def forward(*args, **kwargs):
        if armed.is_set():
            raise torch.AcceleratorError(CUDA_FAULT)
        return real(*args, **kwargs)

    model.forward = forward
    url = srv.url + "/v1/completions"
    try:
        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                async def streamed():
                    lines = []
                    async with client.stream("POST", url, json=LONG) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {") and srv.metric("llada_num_requests_running") >= 2:
                                armed.set()  # both requests are in the batch
                            if line:
                                lines.append(line)
                    return r.status_code, lines

                return await asyncio.gather(streamed(), client.post(url, json={**LONG, "stream": False}))

        (status, lines), plain = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert status == 200 and lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "unavailable" and CUDA_FAULT in error["message"], error
        assert plain.status_code == 503, plain.text
        assert plain.json()["error"]["code"] == "unavailable" and CUDA_FAULT in plain.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").json() == {"status": "dead"}
        assert httpx.get(srv.url + "/health").status_code == 503
        assert httpx.post(url, json={"prompt": [5], "max_tokens": 4}).status_code == 503
        assert len(fatal) == 1 and "device fault" in str(fatal[0])
        assert srv.metric('llada_engine_fatal_errors_total{kind="device"') == 1
        assert srv.metric('llada_request_success_total{finished_reason="error"') >= 2
    finally:
        srv.stop()


# The server with a model whose forward hits a CUDA error on a prompt starting with token 13.
FAULTY_DEVICE = """
import sys
import torch
from server.models.base import RaggedLM
real = RaggedLM.forward
def forward(self, input_ids, *args, **kwargs):
    if int(input_ids[0]) == 13:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return real(self, input_ids, *args, **kwargs)
RaggedLM.forward = forward
from server.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_device_fault_exits_nonzero(text_ckpt):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_DEVICE, "--model", str(text_ckpt), "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: is_healthy(url), 90), "server did not start"
        r = httpx.post(url + "/v1/completions", json={"prompt": [13, 6], "max_tokens": 8, "block_length": 8},
                       timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert proc.wait(60) == 1  # for the orchestrator to restart it
        assert "device fault" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
