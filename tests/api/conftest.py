"""A real uvicorn server on 127.0.0.1 running in this process (so tests can
reach into the engine, as vLLM's in-process client does), over a tiny random
checkpoint with a real tokenizer."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.api.app import ServerState, build_app
from server.api.http_limits import uvicorn_options
from server.config import ModelConfig, SchedulerConfig, ServerConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.metrics import Metrics
from tests.conftest import make_text_checkpoint

MODEL_NAME = "llada-test"


@dataclass
class LiveServer:
    url: str
    state: ServerState
    engine: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{" if "{" not in name else name) or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def start_server(ckpt: Path, server_config: ServerConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None) -> LiveServer:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = replace(server_config or ServerConfig(), port=port)
    name = cfg.served_model_name or MODEL_NAME  # as `llada-serve` names it (llada-demo for the bundled model)
    metrics = Metrics(name)
    engine = AsyncEngine(lambda: LLMEngine(ModelConfig(str(ckpt), dtype="float32", device="cpu"),
                                           scheduler_config or SchedulerConfig()),
                         metrics, cfg.max_queued_requests).start()
    state = ServerState(engine, cfg, name)
    server = uvicorn.Server(uvicorn.Config(build_app(state, metrics), log_level="warning", **uvicorn_options(cfg)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", state, engine, server, thread)
    if wait_for(lambda: is_healthy(live.url), 60):
        return live
    live.stop()
    raise RuntimeError("server did not become healthy")


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory) -> Path:
    return make_text_checkpoint(tmp_path_factory.mktemp("api-ckpt"))


@pytest.fixture(scope="module")
def live(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(default_max_tokens=16, default_block_length=8))
    yield srv
    srv.stop()


def is_healthy(url: str) -> bool:
    """/health answers 200 (a server not yet listening is not healthy)."""
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
