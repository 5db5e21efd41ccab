"""One engine, many workers: tensor-parallel serving on one machine.

The engine's process is rank 0: it runs the scheduler (once) and the API.
``Workers.start`` spawns ranks 1..N-1 (torch.multiprocessing, spawn) and
joins them in a torch.distributed group (NCCL on GPUs, gloo on CPU), plus a
gloo group for control messages. Every rank loads its shard of the model
(``server.models.parallel``) and sizes its KV pool; the ranks agree on the
smallest. Then, for every ``runner.execute`` the engine makes (a step, or
one request of a step being retried alone), rank 0 broadcasts the
``SchedulerOutput`` and every rank runs the same runner on it: the model's
collectives keep them in step and each reaches the same commits, which
only rank 0 uses.

Lifetimes: workers are daemon processes of the engine's process and also
exit when they see it gone (a parent-pid watch), so they die with it. A
worker's death is a device fault (``DeviceFault``): found before each
execute, when a collective fails, and while idle (``check``, which the
engine calls whenever the loop asks for work), it stops the engine: /health
503, every in-flight request gets an error, the server exits non-zero. If
the engine stays stuck in a collective with the dead rank (NCCL may wait
forever), a watch thread ends the process (exit 1) after 30 s.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from server.config import ModelConfig
from server.engine.faults import DeviceFault
from server.engine.messages import RunnerOutput, SchedulerOutput
from server.engine.scheduler import SchedulerConfig
from server.models.parallel import Parallel

logger = logging.getLogger(__name__)


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: cuda:(k + r) for cuda / cuda:k / auto with CUDA, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    base = int(device.split(":")[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def _join(rank: int, size: int, port: int, device: str,
          store: dist.TCPStore | None = None) -> tuple[Parallel, dist.ProcessGroup]:
    """Joins the group whose rendezvous store listens on ``port``: rank 0
    passes the ``store`` it serves, the others connect to it as clients."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=dist.default_pg_timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return Parallel(rank, size), control


def agree_kv(config: SchedulerConfig, control: dist.ProcessGroup) -> SchedulerConfig:
    """Every rank's pool as large as the smallest rank's."""
    if config.kv_cache_tokens is None:
        return config
    tokens = torch.tensor([config.kv_cache_tokens], dtype=torch.int64)
    dist.all_reduce(tokens, op=dist.ReduceOp.MIN, group=control)
    return replace(config, kv_cache_tokens=int(tokens.item()))


def _watch_join(procs: list[Any], joined: threading.Event, exit=os._exit, poll: float = 0.5) -> None:
    """While rank 0 waits in init_process_group for its workers, a worker
    that dies first (a bad device, an import error) would leave it waiting
    for the store's timeout (30 minutes) with /health saying loading: exit
    (1) at once instead, as a model that fails to load does."""
    while not joined.wait(poll):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            logger.error("tensor-parallel worker %s died (exit code %s) before joining: exiting",
                         dead[0].name, dead[0].exitcode)
            exit(1)
            return


class Workers:
    """Ranks 1..N-1, seen from rank 0."""

    def __init__(self, procs: list[Any], parallel: Parallel, control: dist.ProcessGroup, device: str):
        self.procs, self.parallel, self.control, self.device = procs, parallel, control, device
        self.closed = False

    @classmethod
    def start(cls, model_config: ModelConfig, scheduler_config: SchedulerConfig) -> "Workers":
        size = model_config.tensor_parallel_size
        device = rank_device(model_config.device, 0)
        last = rank_device(model_config.device, size - 1)
        if last.startswith("cuda") and torch.cuda.device_count() <= int(last.split(":")[1]):
            raise ValueError(f"tensor_parallel_size: {size} ranks need GPUs {device} to {last}; "
                             f"{torch.cuda.device_count()} visible")
        # The rendezvous store binds a port of the system's choosing and keeps it: probing for a free port
        # and binding it later would leave a window in which another process could take it.
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=dist.default_pg_timeout)
        port = store.port
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, name=f"llada-tp{rank}", daemon=True,
                             args=(rank, size, port, model_config, scheduler_config, os.getpid()))
                 for rank in range(1, size)]
        for p in procs:
            p.start()
        joined = threading.Event()
        threading.Thread(target=_watch_join, args=(procs, joined), name="llada-tp-join", daemon=True).start()
        parallel, control = _join(0, size, port, device, store)
        joined.set()
        logger.info("tensor parallel: %d ranks (%s), workers %s", size, dist.get_backend(),
                    ", ".join(str(p.pid) for p in procs))
        workers = cls(procs, parallel, control, device)
        threading.Thread(target=workers._watch, name="llada-tp-watch", daemon=True).start()
        return workers

    def _watch(self, grace: float = 30.0) -> None:
        """The last resort: a collective blocked on a dead peer may never
        return (NCCL), so the engine never sees the fault; a worker dead for
        ``grace`` seconds without the engine stopping ends the process (1)."""
        dead_since = None
        while not self.closed:
            time.sleep(1.0)
            if all(p.is_alive() for p in self.procs):
                continue
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since > grace and not self.closed:
                logger.error("a tensor-parallel worker died and the engine is stuck in a collective: exiting")
                os._exit(1)

    def check(self) -> None:
        """Raises DeviceFault if a worker has died."""
        for rank, p in enumerate(self.procs, 1):
            if not p.is_alive():
                raise DeviceFault(f"tensor-parallel worker {rank} (pid {p.pid}) died with exit code {p.exitcode}")

    def broadcast(self, obj: Any) -> None:
        dist.broadcast_object_list([obj], src=0, group=self.control)

    def wrap(self, runner: Any) -> "ParallelRunner":
        return ParallelRunner(runner, self)

    def close(self) -> None:
        """Stops the workers (they leave their loop) and leaves the group."""
        if self.closed:
            return
        self.closed = True
        try:
            self.check()
            self.broadcast(None)
        except Exception:  # a worker is gone: the others end with the process
            pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
        dist.destroy_process_group()


class ParallelRunner:
    """The engine's runner on rank 0: each execute's plan goes to every
    rank first, then rank 0 runs its own shard."""

    def __init__(self, runner: Any, workers: Workers):
        self.runner, self.workers = runner, workers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.workers.check()
        try:
            self.workers.broadcast(sched)
            return self.runner.execute(sched)
        except Exception as e:
            self.workers.check()  # a collective failed because a worker died: that is the fault
            # Any other error may have struck this rank alone (an out-of-memory on one GPU), leaving
            # the others inside a collective this rank never joins: no retry can be kept in step,
            # so at more than one rank every failed step is the device's.
            raise DeviceFault(f"tensor-parallel step failed on rank 0: {type(e).__name__}: {e}") from e


def _watch_parent(parent_pid: int) -> None:
    """A worker outlives no engine: exit once the parent is gone."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(rank: int, size: int, port: int, model_config: ModelConfig, scheduler_config: SchedulerConfig,
                 parent_pid: int) -> None:
    from server.engine.kv_sizing import device_memory, size_kv_cache
    from server.engine.buckets import batch_buckets
    from server.engine.runner import ModelRunner
    from server.models.loader import generation_defaults, load_model, resolve_model_path

    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    device = rank_device(model_config.device, rank)
    parallel, control = _join(rank, size, port, device)
    path = resolve_model_path(model_config.model)
    model = load_model(path, model_config.dtype, device, parallel)
    # The same sizing calls as rank 0's (a profile forward is collective), then the smallest pool.
    sc = size_kv_cache(model, scheduler_config, model_config.gpu_memory_utilization, device_memory(model.device),
                       generation_defaults(path).get("gen_length", 128))
    sc = agree_kv(sc, control)
    # Rank 0's buckets too: every rank must pad a step alike, or their collectives' shapes differ.
    runner = ModelRunner(model, model.config.mask_token_id, sc.num_kv_pages, sc.page_size,
                         None if model_config.enforce_eager else batch_buckets(sc.max_num_seqs))
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        if box[0] is None:
            break
        # Any error ends this worker: it may be this rank's alone (an out-of-memory on one GPU), and
        # rank 0, blocked in a collective this rank left, learns of it only from the worker's death.
        runner.execute(box[0])
    dist.destroy_process_group()
