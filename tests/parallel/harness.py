"""Runs jobs on a tensor-parallel group of CPU processes (gloo) and, the
same jobs, on one process: the tests compare the two.

A job is a plain dict (``kind``: "logits" or "generate", the checkpoint,
dtype and inputs); ``run_job(job, parallel)`` returns plain results (logits
as float64 tensors gathered to the whole vocabulary, token lists). One
spawn of ``world`` processes runs every job of a test module; each rank's
results come back so the tests also see that the ranks agree.
"""
from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import reference
from kernels.vocab_parallel import VocabShard
from sampler.distribution import sampling_scores
from sampler.params import DiffusionParams, LikelihoodParams
from server.config import ModelConfig
from server.engine.engine import LLMEngine
from server.engine.scheduler import SchedulerConfig
from server.models.loader import load_model
from server.models.parallel import Parallel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    vocab = getattr(model, "vocab_shard", None)
    if vocab is None:
        return logits
    return vocab.gather(logits.reshape(-1, logits.shape[-1])).view(*logits.shape[:-1], -1)


def run_job(job: dict[str, Any], parallel: Parallel | None) -> Any:
    if job["kind"] == "logits":
        model = load_model(Path(job["path"]), job["dtype"], "cpu", parallel)
        for key, value in job.get("config", {}).items():
            setattr(model.config, key, value)
        with torch.inference_mode():
            ids = job["input_ids"]
            mask = job.get("attention_mask")
            dense = _full(model, model.forward_dense(ids, mask)).double()
            lengths = [len(r) for r in ids.tolist()]
            cu = [0]
            for n in lengths:
                cu.append(cu[-1] + n)
            positions = torch.cat([torch.arange(n) for n in lengths])
            rows = torch.arange(0, cu[-1], 3)
            ragged = _full(model, model(ids.reshape(-1), positions, cu, rows)).double()
        return {"dense": dense, "ragged": ragged}
    if job["kind"] == "scores":  # the vocabulary-parallel unmask scores of given full rows
        logits = job["logits"]
        kwargs = dict(banned_ids=job["banned_ids"], with_margin=True, with_entropy=True)
        args = (job["temperature"], job["seed"], job["row_offset"])
        if parallel is None:
            rows = logits.shape[0]
            family = sampling_scores(logits, args[0], torch.zeros(rows, dtype=torch.int64), torch.ones(rows),
                                     *args[1:], torch.zeros(rows, dtype=torch.bool))
            return reference.unmask_scores(logits, *args, **kwargs), family
        shard = VocabShard(parallel.rank, parallel.size, logits.shape[1])
        mine = logits[:, shard.start:shard.end]
        return shard.unmask_scores(mine, *args, **kwargs), shard.sampling_scores(mine, *args)
    engine = LLMEngine(ModelConfig(model=job["path"], dtype=job["dtype"], device="cpu",
                                   enforce_eager=job.get("enforce_eager", True)),
                       SchedulerConfig(max_num_seqs=64, kv_cache_tokens=job.get("kv_cache_tokens", 4096)),
                       parallel=parallel)
    out: dict[str, Any] = {}
    for i, (prompt, params) in enumerate(job["requests"]):
        engine.add_request(f"g{i}", prompt, DiffusionParams(**(engine.decoding_defaults | params)))
    for i, (context, continuation, params) in enumerate(job.get("likelihood", [])):
        engine.scheduler.add(engine.make_likelihood_request(f"l{i}", context, continuation, LikelihoodParams(**params)))
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                assert o.finish_reason != "error", o.error
                if o.req_id.startswith("l"):
                    out[o.req_id] = o.likelihood
                else:
                    lp = None if o.logprobs is None else [(t.logprob, t.top) for t in o.logprobs]
                    out[o.req_id] = (o.token_ids, o.finish_reason, lp)
    return out


def _worker(rank: int, world: int, port: int, jobs: list[dict[str, Any]], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = [run_job(job, Parallel(rank, world)) for job in jobs]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_parallel(jobs: list[dict[str, Any]], world: int = 2) -> list[list[Any]]:
    """Each rank's results of every job: [rank][job]."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, free_port(), jobs, tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_ranks_agree(results: tuple) -> None:
    """Both ranks return the same generated tokens for every generate job."""
    jobs, tp, _ = results
    for job, a, b in zip(jobs, tp[0], tp[1]):
        if job["kind"] == "generate":
            assert a == b, job.get("name", job["path"])


def assert_logits_equal(results: tuple) -> None:
    """Every logits job's TP result equals one process's (dense and ragged):
    within 1e-10 relative in float64, 2e-5 in float32."""
    jobs, tp, single = results
    for job, got, want in zip(jobs, tp[0], single):
        if job["kind"] != "logits":
            continue
        tol = 1e-10 if job["dtype"] == "float64" else 2e-5
        for key in ("dense", "ragged"):
            assert got[key].shape == want[key].shape
            err = (got[key] - want[key]).abs().max().item() / want[key].abs().max().item()
            assert err < tol, (job["path"], job["dtype"], key, err)
