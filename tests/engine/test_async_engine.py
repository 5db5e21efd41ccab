"""AsyncEngine hands a step's outputs to the event loop in one wake-up, and
gives each caller the outputs it can use: those that extend the final prefix
or finish the request, or every step's when asked (the denoising stream)."""
from __future__ import annotations

import asyncio

from sampler.params import DiffusionParams
from server.config import ModelConfig, SchedulerConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.metrics import Metrics
from tests.conftest import make_random_checkpoint

PARAMS = DiffusionParams(gen_length=16, block_length=8, steps=16, temperature=0.0)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def test_outputs_filtered_and_handed_over_once_per_step(tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "ckpt", eos_token_id=None, pad_token_id=None)
    engine = AsyncEngine(lambda: LLMEngine(ModelConfig(str(ckpt), dtype="float32", device="cpu"),
                                           SchedulerConfig()), Metrics("t")).start()
    try:
        async def run(every_step: bool):
            while not engine.is_ready:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            handovers = 0
            real = loop.call_soon_threadsafe

            def counting(*args):
                nonlocal handovers
                handovers += 1
                return real(*args)

            loop.call_soon_threadsafe = counting
            steps_before = int(engine.metrics.steps._value.get())
            streams = [engine.submit(f"r{every_step}{i}", p, PARAMS, every_step) for i, p in enumerate(PROMPTS)]

            async def drain(stream):
                return [out async for out in stream]

            outs = await asyncio.gather(*(drain(s) for s in streams))
            steps = int(engine.metrics.steps._value.get()) - steps_before
            return outs, handovers, steps

        filtered, handovers, steps = asyncio.run(run(False))
        every, _, _ = asyncio.run(run(True))
    finally:
        engine.shutdown()

    for got, all_steps in zip(filtered, every):
        final = all_steps[-1]
        assert final.finished and got[-1].finished and got[-1].token_ids == final.token_ids
        assert len(all_steps) == final.num_steps == got[-1].num_steps  # one output per step when asked
        assert all(o.new_token_ids or o.finished for o in got)  # otherwise only the useful ones
        assert [t for o in got for t in o.new_token_ids] == final.token_ids  # and nothing is lost
    assert sum(map(len, filtered)) < sum(map(len, every))
    assert handovers <= steps  # four requests, one wake-up per step at most


def test_the_client_surface_while_loading_and_after(tmp_path):
    """Until the engine thread has loaded the model there are no facts and
    validate/submit say so; then facts is the engine's own snapshot."""
    import threading
    import time

    import pytest

    from server.engine.async_engine import EngineNotReadyError
    from server.engine.facts import RequestError

    ckpt = make_random_checkpoint(tmp_path / "ckpt")
    loaded = threading.Event()

    def factory():
        loaded.wait(30)
        return LLMEngine(ModelConfig(str(ckpt), dtype="float32", device="cpu"), SchedulerConfig())

    engine = AsyncEngine(factory, Metrics("t")).start()
    try:
        assert engine.facts is None and not engine.is_ready
        with pytest.raises(EngineNotReadyError):
            engine.validate([5, 6], PARAMS)
        loaded.set()
        deadline = time.monotonic() + 30
        while not engine.is_ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.facts is engine.engine.facts
        engine.validate([5, 6], PARAMS)
        with pytest.raises(RequestError, match="gen_length: the prompt"):
            engine.validate([5] * 250, PARAMS)
        assert engine.num_waiting == 0
    finally:
        engine.shutdown()


def test_shutdown_closes_the_engine_on_its_own_thread(tmp_path):
    """A normal shutdown ends with ``LLMEngine.close`` (tensor-parallel
    workers leave their loop), called from the engine thread, which owns the
    workers' collectives; a failing close is logged, not raised."""
    import threading
    import time

    ckpt = make_random_checkpoint(tmp_path / "ckpt")
    closed: list[str] = []

    class Engine(LLMEngine):
        def close(self) -> None:
            closed.append(threading.current_thread().name)
            raise RuntimeError("a worker is already gone")

    engine = AsyncEngine(lambda: Engine(ModelConfig(str(ckpt), dtype="float32", device="cpu"), SchedulerConfig()),
                         Metrics("t")).start()
    deadline = time.monotonic() + 30
    while not engine.is_ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.is_ready and closed == []
    engine.shutdown()
    assert closed == ["llada-engine"]
