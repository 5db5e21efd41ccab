"""Draining a live server process (SIGTERM): at --drain-timeout every open
stream ends with a "shutdown" error event, [DONE] and a clean chunked end,
a non-streamed request with a 503 envelope; clients that stall (a body that
never finishes, a stream nobody reads) do not hold the exit for the whole
drain time; an idle server exits 0 at once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.api.conftest import is_healthy, wait_for
from tests.api.test_faults import _free_port
from tests.conftest import REPO

# Long enough to outlast a short drain on any machine: a 240-position canvas, one commit per step.
LONG = {"prompt": [5, 6, 7], "max_tokens": 240, "steps": 240, "block_length": 240}


class Server(subprocess.Popen):
    """A server process whose output lines are kept with their arrival times
    (the interpreter's own exit can take seconds on a loaded machine: the
    server's last line is what says when it was done)."""

    def __init__(self, args: list[str]):
        super().__init__(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def finished_at(self) -> float:
        """When the server said it was done (after the process exited)."""
        self.wait(60)
        assert wait_for(lambda: any("Finished server process" in line for _, line in self.lines), 5), self.lines[-20:]
        return next(t for t, line in self.lines if "Finished server process" in line)


@pytest.fixture
def launch(text_ckpt):
    procs = []

    def start(*flags: str) -> tuple[Server, str]:
        port = _free_port()
        proc = Server([sys.executable, "-m", "server", "--model", str(text_ckpt), "--port", str(port),
                       "--log-level", "info", *flags])
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: is_healthy(url), 90), "server did not start"
        return proc, url

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_idle_server_exits_zero_at_once(launch):
    proc, _ = launch("--drain-timeout", "60")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert proc.finished_at() - started < 3


def test_the_deadline_ends_streams_with_a_shutdown_event_and_others_with_503(launch):
    proc, url = launch("--drain-timeout", "0.5")
    result = {}

    def streamed():
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            result["stream"] = [line for line in r.iter_lines() if line]  # raises on a cut chunked body

    def plain():
        result["plain"] = httpx.post(url + "/v1/completions", json={**LONG, "n": 2}, timeout=60)

    def likelihood():
        result["likelihood"] = httpx.post(url + "/v1/loglikelihood", timeout=60, json={
            "requests": [{"context": [5, 6, 7], "continuation": [8, 9] * 60}], "mc_num": 4096, "seed": 1})

    threads = [threading.Thread(target=f) for f in (streamed, plain, likelihood)]
    for t in threads:
        t.start()
    assert wait_for(lambda: _num_requests(url) >= 4, 30)  # 1 + 2 choices + 1 likelihood, queued or running
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert proc.wait(60) == 0
    assert proc.finished_at() - started < 8
    lines = result["stream"]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["error"]["code"] == "shutdown" and last["error"]["type"] == "server_error"
    assert all("error" not in json.loads(line[6:]) for line in lines[:-2])  # the rest were ordinary chunks
    for name in ("plain", "likelihood"):
        r = result[name]
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutdown", (name, r.text)


def _num_requests(url: str) -> float:
    """Requests the engine holds (running + waiting), from /metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("llada_num_requests_running{", "llada_num_requests_waiting{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    return sock


def test_stalled_clients_do_not_hold_the_drain(launch):
    proc, url = launch("--drain-timeout", "120")
    body = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    stalled_body = _connect(url)
    stalled_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    # A stream whose client reads nothing (its answer fits the socket buffers here: the server is
    # done with it once written; a stream blocked on a full buffer is cut when the server closes).
    unread = _connect(url, rcvbuf=4096)
    stream = json.dumps({"prompt": [5, 6, 7], "max_tokens": 16, "stream": True,
                         "stream_options": {"include_denoising": True}}).encode()
    unread.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(stream) + stream)
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert proc.finished_at() - started < 15  # far less than the 120 s drain
    stalled_body.settimeout(5)
    answer = stalled_body.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503") and b'"code":"shutdown"' in answer
    stalled_body.close()
    unread.close()


def test_a_slow_upload_that_keeps_arriving_is_not_stalled(monkeypatch):
    """The stall clock restarts with every piece of the body: a client
    uploading slowly holds the drain; one that stopped sending does not."""
    import asyncio

    from server.api import drain as drain_module

    now = [0.0]
    monkeypatch.setattr(drain_module.time, "monotonic", lambda: now[0])
    pieces = [{"type": "http.request", "body": b"{", "more_body": True},
              {"type": "http.request", "body": b"}", "more_body": False}]

    async def receive():
        return pieces.pop(0)

    async def send(message):
        return None

    drain = drain_module.Drain()
    entry, tracked_receive, _ = drain.track(receive, send)
    drain.requests.add(entry)
    now[0] = 1.5
    asyncio.run(tracked_receive())  # the first piece, 1.5 s after the request came
    now[0] = 3.0
    assert not drain.all_stalled(2.0)  # 1.5 s since the last piece
    now[0] = 3.6
    assert drain.all_stalled(2.0)  # 2.1 s without a piece
    asyncio.run(tracked_receive())  # the body is complete: waiting on the engine, not the client
    assert not drain.all_stalled(0.0)
