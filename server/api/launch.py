"""Starting the server: configs from the parsed CLI, the engine thread, the
app under uvicorn, and graceful draining.

SIGTERM/SIGINT drain: /health turns 503 and new generation requests get 503
while in-flight ones run to completion (up to ``drain_timeout``); then the
process exits 0. At the deadline every stream still open ends with a
``shutdown`` error event and ``[DONE]``, every other request with a 503.
The drain ends early when every request left has waited ``STALL_S`` on its
client (a body that never finishes, a stream nobody reads): those are cut
when the server closes. A second signal exits at once. If the engine loop
dies, the process exits 1 so an orchestrator restarts it.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

import uvicorn

from server.api.app import ServerState, build_app
from server.api.http_limits import uvicorn_options
from server.config import ModelConfig, SchedulerConfig, ServerConfig
from server.metrics import Metrics

logger = logging.getLogger("llada_serve")

STALL_S = 2.0  # a request waiting this long on its client no longer holds the drain
FAREWELL_S = 2.0  # after the deadline, time for streams to send their last events


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining or self._loop is None:
            return super().handle_exit(sig, frame)
        self.state.draining = True
        logger.info("draining: %d in-flight requests, up to %.0fs", self.state.in_flight, self.state.config.drain_timeout)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        state, drain = self.state, self.state.drain
        deadline = time.monotonic() + state.config.drain_timeout
        while state.in_flight > 0 and time.monotonic() < deadline and not drain.all_stalled(STALL_S):
            await asyncio.sleep(0.05)
        if state.in_flight:
            stalled = drain.all_stalled(STALL_S)
            logger.warning("drain %s: ending %d requests still in flight",
                           "stopped waiting on stalled clients" if stalled else "timeout", state.in_flight)
            drain.expire()
            farewell = time.monotonic() + FAREWELL_S
            while state.in_flight > 0 and time.monotonic() < farewell and not drain.all_stalled(0):
                await asyncio.sleep(0.02)
        self.should_exit = True


BUNDLED_MODEL_NAME = "llada-demo"  # what the API calls the bundled demo model


def is_bundled_model(args) -> bool:
    """Whether the launch serves the demo model shipped in the package (no --model)."""
    from server.__main__ import bundled_model

    return args.model is not None and args.model == bundled_model()


def served_model_name(args) -> str:
    """The name clients use: --served-model-name, else --model as given,
    except the bundled demo model, which is ``llada-demo`` (not a path of
    this machine's that clients would have to echo)."""
    if args.served_model_name:
        return args.served_model_name
    return BUNDLED_MODEL_NAME if is_bundled_model(args) else args.model


def build_configs(args) -> tuple[ModelConfig, SchedulerConfig, ServerConfig]:
    """The three configs from the parsed flags, without reading the
    checkpoint (a hub model downloads on the engine thread, after the server
    listens). Request defaults the user left out are the model's, resolved
    once it is loaded. Raises ValueError naming a bad flag."""
    model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device,
                               max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                               tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager,
                               graph_block_lengths=(args.default_block_length,) if args.default_block_length else ())
    scheduler_config = SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=args.max_num_batched_tokens,
                                       kv_cache_tokens=args.kv_cache_tokens)
    server_config = ServerConfig(
        host=args.host, port=args.port, served_model_name=served_model_name(args), api_key=args.api_key,
        max_queued_requests=args.max_queued_requests, drain_timeout=args.drain_timeout,
        max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
        default_max_tokens=args.default_max_tokens,
        default_steps=args.default_steps, default_block_length=args.default_block_length,
        default_decoding=args.default_decoding, default_remasking=args.default_remasking,
        default_threshold=args.default_threshold, playground=not args.no_playground,
        bundled_demo=is_bundled_model(args))
    return model_config, scheduler_config, server_config


def serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.engine.async_engine import AsyncEngine

    try:
        model_config, scheduler_config, server_config = build_configs(args)
    except ValueError as e:
        print(f"llada-serve: error: {e}", file=sys.stderr)
        return 2
    model_name = server_config.served_model_name
    metrics = Metrics(model_name)

    def on_fatal(error: BaseException) -> None:
        logger.error("engine failed (%s): exiting", error)
        server.should_exit = True

    # The server exists before the engine thread starts, so a model that fails
    # to load (or a loop that dies) always has a server to stop.
    engine = AsyncEngine.for_model(model_config, scheduler_config, metrics, server_config.max_queued_requests,
                                   on_fatal)
    state = ServerState(engine, server_config, model_name)
    uv_config = uvicorn.Config(build_app(state, metrics), host=server_config.host, port=server_config.port,
                               log_level=args.log_level, timeout_graceful_shutdown=5,
                               **uvicorn_options(server_config))
    server = DrainingServer(uv_config, state)
    engine.start()
    logger.info("serving %s on http://%s:%d%s", model_name, server_config.host, server_config.port,
                " (playground at /)" if server_config.playground else "")
    server.run()
    engine.shutdown()
    return 1 if engine.is_dead else 0
