"""Tensor-parallel failure paths that need no second process: at more than
one rank any failed step is a device fault (a rank's own out-of-memory
would otherwise leave the ranks' collectives out of step), and a worker
that dies before joining ends rank 0 at once instead of after the store's
timeout; the rendezvous port is held from before the workers start."""
from __future__ import annotations

import socket
import threading

import pytest

from server.engine.faults import DeviceFault
from server.engine.messages import SchedulerOutput
from server.engine.tp_workers import ParallelRunner, _watch_join


class FakeWorkers:
    def __init__(self, alive: bool = True):
        self.alive, self.sent = alive, []

    def check(self) -> None:
        if not self.alive:
            raise DeviceFault("tensor-parallel worker 1 died")

    def broadcast(self, obj) -> None:
        self.sent.append(obj)


class FailingRunner:
    def __init__(self, error: Exception):
        self.error = error

    def execute(self, sched):
        raise self.error


@pytest.mark.parametrize("error", [ValueError("a request's bad state"), RuntimeError("CUDA out of memory")])
def test_any_failed_step_at_two_ranks_is_a_device_fault(error):
    workers = FakeWorkers()
    runner = ParallelRunner(FailingRunner(error), workers)
    sched = SchedulerOutput()
    with pytest.raises(DeviceFault, match="rank 0") as info:
        runner.execute(sched)
    assert info.value.__cause__ is error and workers.sent == [sched]  # the plan went out before the step


def test_a_dead_worker_is_named_before_the_step_error():
    workers = FakeWorkers()
    runner = ParallelRunner(FailingRunner(ValueError("x")), workers)
    workers.alive = False
    with pytest.raises(DeviceFault, match="died"):
        runner.execute(SchedulerOutput())


class FakeProc:
    def __init__(self, alive: bool):
        self.alive, self.name, self.exitcode = alive, "llada-tp1", None if alive else 1

    def is_alive(self) -> bool:
        return self.alive


def test_a_worker_dead_before_joining_exits_rank_zero():
    exits: list[int] = []
    proc = FakeProc(alive=True)
    joined = threading.Event()
    watcher = threading.Thread(target=_watch_join, args=([proc], joined, exits.append, 0.01))
    watcher.start()
    proc.alive = False
    watcher.join(5)
    assert not watcher.is_alive() and exits == [1]


def test_a_join_that_completes_stops_the_watch_without_exiting():
    exits: list[int] = []
    joined = threading.Event()
    watcher = threading.Thread(target=_watch_join, args=([FakeProc(alive=True)], joined, exits.append, 0.01))
    watcher.start()
    joined.set()
    watcher.join(5)
    assert not watcher.is_alive() and exits == []


def test_the_rendezvous_port_is_held_before_the_workers_start(monkeypatch):
    """Rank 0's store binds the port it hands the workers: no probe-then-bind
    window in which another process could take it (the workers would then
    join a stranger, or rank 0 fail to bind)."""
    from server.config import ModelConfig, SchedulerConfig
    from server.engine import tp_workers

    ports = []

    class Ctx:
        def Process(self, target, name, daemon, args):
            port = args[2]

            class Proc:
                def start(self):
                    with socket.socket() as s, pytest.raises(OSError):  # in use: nobody else can take it
                        s.bind(("127.0.0.1", port))
                    ports.append(port)
                    raise RuntimeError("no worker in this test")

            return Proc()

    monkeypatch.setattr(tp_workers.mp, "get_context", lambda method: Ctx())
    with pytest.raises(RuntimeError, match="no worker in this test"):
        tp_workers.Workers.start(ModelConfig("unused", device="cpu", tensor_parallel_size=2), SchedulerConfig())
    assert len(ports) == 1 and ports[0] > 0
