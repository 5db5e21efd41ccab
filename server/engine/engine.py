"""LLMEngine: one model, one scheduler, one runner; ``step()`` is schedule,
execute, update. Synchronous; the offline ``LLM`` drives it in a loop and the
async server drives it from its own thread."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from sampler.params import DiffusionParams, LikelihoodParams
from server.config import ModelConfig
from server.engine.facts import ModelFacts
from server.engine.faults import check_device
from server.engine.graphs import capture_at_start, why_no_graphs
from server.engine.buckets import batch_buckets
from server.engine.likelihood import LikelihoodRequest, owner_of
from server.engine.messages import RequestOutput, RunnerOutput, SchedulerOutput
from server.engine.request import Request, RequestStatus
from server.engine.runner import ModelRunner
from server.engine.kv_sizing import MemorySource, device_memory, size_kv_cache
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.stop_strings import StopStringState
from server.models.loader import card_examples, generation_defaults, load_model, resolve_model_path
from server.models.registry import architecture
from server.tokenizer import Tokenizer, stop_token_ids

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    num_seqs: int  # requests that took a step
    num_committed: int  # tokens committed, all requests
    admitted: list[str]  # req_ids admitted in this step


class LLMEngine:
    def __init__(self, model_config: ModelConfig, scheduler_config: SchedulerConfig | None = None,
                 memory: MemorySource | None = None, parallel=None):
        """``memory``: where the KV pool's size comes from (default: CUDA's
        figures on a GPU, none on CPU: see server/engine/kv_sizing.py).
        ``model_config.tensor_parallel_size`` > 1: this process is rank 0
        and starts the other ranks (server/engine/tp_workers.py).
        ``parallel`` (``server.models.parallel.Parallel``): this process is
        one rank of a group that someone else drives in lockstep (tests)."""
        self.model_config = model_config
        self.path: Path = resolve_model_path(model_config.model)
        self.workers = None
        device = model_config.device
        if model_config.tensor_parallel_size > 1:
            from server.engine.tp_workers import Workers

            self.workers = Workers.start(model_config, scheduler_config or SchedulerConfig())
            parallel, device = self.workers.parallel, self.workers.device
        self.model = load_model(self.path, model_config.dtype, device, parallel)
        self.raw_config = json.loads((self.path / "config.json").read_text())
        cfg = self.model.config
        self.mask_id: int = cfg.mask_token_id
        self.vocab_size: int = cfg.embedding_size
        self.max_model_len: int = model_config.max_model_len or cfg.max_sequence_length
        self.tokenizer = Tokenizer.load(self.path)
        self.stop_ids = stop_token_ids(self.path, self.raw_config, self.tokenizer)
        # The checkpoint's own decoding (its family's, then its generation config): DiffusionParams fields.
        self.decoding_defaults = generation_defaults(self.path)
        sc = scheduler_config or SchedulerConfig()
        # The captured steps' widths: the checkpoint's default block length and the server's, if given.
        widths = sorted({self.decoding_defaults.get("block_length", DiffusionParams.block_length),
                         *model_config.graph_block_lengths})
        tensor_parallel = self.workers is not None or parallel is not None
        graph_steps = None  # the steps captured as CUDA graphs, whose memory the KV pool leaves free
        if not model_config.enforce_eager and sc.kv_cache_tokens != 0 \
                and why_no_graphs(self.model, self.model.device, tensor_parallel, True) is None:
            graph_steps = [(b, w) for b in batch_buckets(sc.max_num_seqs) for w in widths]
        sc = size_kv_cache(self.model, sc, model_config.gpu_memory_utilization,
                           memory if memory is not None else device_memory(self.model.device),
                           self.decoding_defaults.get("gen_length", 128), graph_steps)
        if self.workers is not None:
            from server.engine.tp_workers import agree_kv

            sc = agree_kv(sc, self.workers.control)
        self.scheduler = Scheduler(sc)
        self.runner = ModelRunner(self.model, self.mask_id, sc.num_kv_pages, sc.page_size,
                                  None if model_config.enforce_eager else batch_buckets(sc.max_num_seqs))
        if not model_config.enforce_eager:
            capture_at_start(self.runner, self.model.device, widths, self.max_model_len, tensor_parallel)
        if self.workers is not None:
            self.runner = self.workers.wrap(self.runner)
        self.last_step = StepStats(0, 0, [])
        self.facts = ModelFacts(
            model=model_config.model, architecture=type(self.model).__name__, max_model_len=self.max_model_len,
            vocab_size=self.vocab_size, mask_id=self.mask_id, stop_ids=frozenset(self.stop_ids),
            decoding_modes=tuple(self.model.decoding_modes),
            is_block_causal=bool(getattr(cfg, "block_causal_size", 0)),
            max_num_batched_tokens=sc.max_num_batched_tokens, num_kv_pages=sc.num_kv_pages, page_size=sc.page_size,
            decoding_defaults=MappingProxyType(dict(self.decoding_defaults)), tokenizer=self.tokenizer,
            checkpoint_architecture=architecture(self.raw_config), model_type=self.raw_config.get("model_type"),
            num_parameters=sum(p.numel() for p in self.model.parameters()),
            examples=tuple(MappingProxyType(e) for e in card_examples(self.path)))
        self._stop_strings: dict[str, StopStringState] = {}  # req_id -> its stop strings, for those that have any

    def make_request(self, req_id: str, prompt_ids: list[int], params: DiffusionParams,
                     arrival_time: float | None = None) -> Request:
        """A validated request, ready for ``add``; raises RequestError."""
        self.facts.check_generation(prompt_ids, params)
        # ignore_eos: no id ends the answer, so EOS/EoT are committed and returned like any token.
        req = Request(req_id, list(prompt_ids), params, self.mask_id, frozenset() if params.ignore_eos else self.stop_ids)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        return req

    def make_likelihood_request(self, req_id: str, context_ids: list[int], continuation_ids: list[int],
                                params: LikelihoodParams, arrival_time: float | None = None) -> LikelihoodRequest:
        """A validated likelihood request, ready for ``add``; raises RequestError."""
        self.facts.check_likelihood(context_ids, continuation_ids, params)
        req = LikelihoodRequest(req_id, list(context_ids), list(continuation_ids), params, self.mask_id,
                                self.scheduler.config.max_num_batched_tokens)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        return req

    def add(self, req: Request | LikelihoodRequest) -> None:
        """Queues a request built by ``make_request`` or ``make_likelihood_request``."""
        if isinstance(req, Request) and req.params.stop:
            self._stop_strings[req.req_id] = StopStringState(req.params.stop)
        self.scheduler.add(req)

    def add_request(self, req_id: str, prompt_ids: list[int], params: DiffusionParams) -> Request:
        req = self.make_request(req_id, prompt_ids, params)
        self.add(req)
        return req

    def abort_request(self, req_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED
                      ) -> Request | LikelihoodRequest | None:
        """Removes a request wherever it is; returns it, or None if unknown."""
        self._stop_strings.pop(req_id, None)
        return self.scheduler.abort(req_id, status)

    def has_unfinished(self) -> bool:
        if self.workers is not None:
            self.workers.check()  # a dead tensor-parallel worker stops the engine, busy or idle
        return self.scheduler.has_unfinished()

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any."""
        if self.workers is not None:
            self.workers.close()

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        failed = [RequestOutput(req_id, [], [], True, "error", error) for req_id, error in sched.failed.items()]
        try:
            result = self.runner.execute(sched)
        except Exception as e:
            check_device(e, alone=False)  # a CUDA error stops the engine; an OOM is retried split
            # Find the request that broke the batch: run each alone; those that
            # still fail are failed, the rest keep their step.
            logger.warning("a batch of %d failed; running its requests one by one", len(sched.seqs), exc_info=True)
            result = RunnerOutput()
            parts = [SchedulerOutput(seqs=[seq]) for seq in sched.seqs]
            parts += [SchedulerOutput(scores=[score]) for score in sched.scores]
            for part in parts:
                req_id = owner_of((part.seqs or part.scores)[0].req_id)
                if any(f.req_id == req_id for f in failed):
                    continue
                try:
                    alone = self.runner.execute(part)
                    result.commits.update(alone.commits)
                    result.confidences.update(alone.confidences)
                    result.logprobs.update(alone.logprobs)
                    result.scores.update(alone.scores)
                except Exception as e:
                    check_device(e, alone=True)
                    logger.exception("request %s failed in the model runner", req_id)
                    failed.append(self._fail(req_id, e))
        num_committed = sum(len(positions) for positions, _ in result.commits.values())
        num_seqs = len({owner_of(x.req_id) for x in [*sched.seqs, *sched.scores]})
        self.last_step = StepStats(num_seqs, num_committed, sched.admitted)
        outputs = failed + self.scheduler.update(result)
        if self._stop_strings:
            outputs = [self._check_stop_strings(out) for out in outputs]
        return outputs

    def _check_stop_strings(self, out: RequestOutput) -> RequestOutput:
        state = self._stop_strings.get(out.req_id)
        if state is None:
            return out
        if out.finish_reason == "error":
            del self._stop_strings[out.req_id]
            return out
        checked = state.check(out, self.tokenizer.decode)
        if checked.finished:
            del self._stop_strings[out.req_id]
            if not out.finished:  # the answer is fixed: free its slot now
                self.scheduler.abort(out.req_id, RequestStatus.FINISHED_STOPPED)
        return checked

    def _fail(self, req_id: str, error: Exception) -> RequestOutput:
        req = self.scheduler.abort(req_id, RequestStatus.FINISHED_ERROR, f"{type(error).__name__}: {error}")
        return RequestOutput(req_id, [], req.output_ids if req else [], True, "error", req.error if req else None)
