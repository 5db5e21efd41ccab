"""AsyncEngine: one engine loop in a background thread, many asyncio callers.

The loop thread owns the LLMEngine (loads it, then steps it whenever there is
work) and all of its state. Callers see a small surface: ``facts`` (an
immutable snapshot of the model), ``validate``, ``submit`` and ``abort``.
Requests cross as plain data through a thread-safe inbox and become engine
state on the loop thread; outputs come back through a per-request asyncio
queue. A caller that goes away
(cancelled, client disconnected) aborts its request, which leaves the batch
before the next step. A failure inside one request fails that request alone;
on a device fault (server/engine/faults.py), or if the loop itself dies,
every caller gets an error, ``is_dead`` turns true, the metrics count it and
``on_fatal`` is called so the process can exit non-zero.

A step's outputs reach the callers' event loop in one hand-over (one wake-up
per step, not one per request), and a caller gets only the outputs it can
use: those that extend the final prefix or finish the request, or every
step's when it asked for them (the denoising stream).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

from sampler.params import DiffusionParams, LikelihoodParams
from server.engine.facts import ModelFacts, RequestError
from server.engine.faults import DeviceFault
from server.engine.likelihood import LikelihoodRequest
from server.engine.messages import RequestOutput
from server.engine.request import Request, RequestStatus
from server.metrics import Metrics

if TYPE_CHECKING:  # the engine (torch) is only built in the loop thread
    from server.config import ModelConfig
    from server.engine.engine import LLMEngine
    from server.engine.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has died; the server must be restarted."""


class QueueFullError(RuntimeError):
    """The waiting queue is at max_queued_requests."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


@dataclass
class _Submission:
    """A request as a caller hands it over: plain data, built into engine
    state on the engine thread."""

    req_id: str
    kind: str  # generation | loglikelihood
    args: tuple  # (prompt_ids, params) or (context_ids, continuation_ids, params)
    arrival_time: float


class AsyncEngine:
    """The engine as the server's event loop sees it: ``facts`` (an immutable
    snapshot of the model, once loaded), ``validate``, ``submit``, ``abort``,
    and the ready/dead/queue state. Every method here is safe on any thread;
    the LLMEngine itself (``engine``) belongs to the engine thread, and only
    tests reach into it."""

    def __init__(self, engine_factory: Callable[[], "LLMEngine"], metrics: Metrics, max_queued_requests: int = 256,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self._factory = engine_factory
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.on_fatal = on_fatal
        self.engine: "LLMEngine | None" = None  # the engine thread's; set once loaded
        self.facts: ModelFacts | None = None  # set once loaded, never changed
        self.dead: BaseException | None = None
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._queued: set[str] = set()  # submitted, not yet admitted nor finished (set ops are atomic)
        self._requests: dict[str, Request | LikelihoodRequest] = {}  # engine thread: live requests, by req_id
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._every_step: set[str] = set()  # req_ids whose caller wants every step's output
        self._thread = threading.Thread(target=self._run, name="llada-engine", daemon=True)

    @classmethod
    def for_model(cls, model_config: "ModelConfig", scheduler_config: "SchedulerConfig", metrics: Metrics,
                  max_queued_requests: int = 256,
                  on_fatal: Callable[[BaseException], None] | None = None) -> "AsyncEngine":
        """An engine that loads ``model_config``'s model on its own thread once started."""
        def build() -> "LLMEngine":
            from server.engine.engine import LLMEngine

            return LLMEngine(model_config, scheduler_config)

        return cls(build, metrics, max_queued_requests, on_fatal)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_ready(self) -> bool:
        return self.facts is not None and self.dead is None

    @property
    def is_dead(self) -> bool:
        return self.dead is not None

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet admitted to the batch."""
        return len(self._queued)

    # -- callers (any thread; submit from an event loop) ------------------------------------
    def validate(self, prompt_ids: list[int], params: DiffusionParams) -> None:
        """Raises RequestError (naming the engine's field) if the request
        could never run, EngineDeadError or EngineNotReadyError."""
        self._check_alive().check_generation(prompt_ids, params)

    def validate_likelihood(self, context_ids: list[int], continuation_ids: list[int],
                            params: LikelihoodParams) -> None:
        """Raises RequestError if the pair could never be scored (or the engine is not up)."""
        self._check_alive().check_likelihood(context_ids, continuation_ids, params)

    def submit(self, req_id: str, prompt_ids: list[int], params: DiffusionParams,
               every_step: bool = False) -> AsyncIterator[RequestOutput]:
        """Queues a generation now (raising QueueFullError, EngineDeadError
        or EngineNotReadyError at once) and returns the iterator of its
        outputs, which ends with the finished one: those that add final
        tokens, or with ``every_step`` one per step. A request the engine
        refuses finishes at once with finish_reason "error". Leaving the
        iteration early aborts the request; so does ``abort`` for a stream
        never iterated."""
        return self._submit(_Submission(req_id, "generation", (list(prompt_ids), params), time.monotonic()),
                            len(prompt_ids), every_step)

    def submit_likelihood(self, req_id: str, context_ids: list[int], continuation_ids: list[int],
                          params: LikelihoodParams) -> AsyncIterator[RequestOutput]:
        """Queues a likelihood estimate, as ``submit`` does a generation."""
        sub = _Submission(req_id, "loglikelihood", (list(context_ids), list(continuation_ids), params),
                          time.monotonic())
        return self._submit(sub, len(context_ids) + len(continuation_ids), False)

    def _submit(self, sub: _Submission, num_prompt_tokens: int, every_step: bool) -> AsyncIterator[RequestOutput]:
        self._check_alive()
        if self.num_waiting >= self.max_queued_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_queued_requests} requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[sub.req_id] = (asyncio.get_running_loop(), queue)
        self._queued.add(sub.req_id)
        if every_step:
            self._every_step.add(sub.req_id)
        if self.dead is not None:  # the loop died between the check and the registration
            self._forget(sub.req_id)
            self._check_alive()
        self.metrics.prompt_tokens.inc(num_prompt_tokens)
        self.metrics.request(sub.kind)
        self._post("add", sub)
        return self._outputs(sub.req_id, queue)

    async def _outputs(self, req_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req_id)

    def abort(self, req_id: str) -> None:
        """Stops a request before the engine's next step."""
        self._forget(req_id)
        self._post("abort", req_id)

    def _forget(self, req_id: str) -> None:
        self._streams.pop(req_id, None)
        self._every_step.discard(req_id)

    def _check_alive(self) -> ModelFacts:
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead}")
        facts = self.facts
        if facts is None:
            raise EngineNotReadyError("the model is still loading")
        return facts

    def _post(self, verb: str, arg: object) -> None:
        self._inbox.append((verb, arg))
        self._wake.set()

    # -- the loop (engine thread) -------------------------------------------------------
    def _run(self) -> None:
        error: BaseException = EngineDeadError("the engine was shut down")
        try:
            self.engine = self._factory()
            self.facts = self.engine.facts
            logger.info("engine ready")
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._publish_queue()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                outputs = self.engine.step()
                self._record_step(time.perf_counter() - t0, outputs)
                self._deliver_all(outputs)
        except BaseException as e:  # a device fault, or the loop itself broke: nothing can be served any more
            logger.exception("engine loop died")
            self.dead = error = e
            self.metrics.fatal("device" if isinstance(e, DeviceFault) else "engine")
            for _ in self._requests:  # every request in flight fails with it
                self.metrics.finished(RequestStatus.FINISHED_ERROR.value)
            if self.on_fatal is not None:
                self.on_fatal(e)
        finally:  # no stream is left waiting, whether the loop died or was shut down
            for rid in list(self._streams):
                self._send(rid, EngineDeadError(f"the engine loop has stopped: {error}"))
            if self.engine is not None:  # tensor-parallel workers leave their loop (from this thread: collectives)
                try:
                    self.engine.close()
                except Exception:  # noqa: BLE001 - shutting down: a worker already gone is not news
                    logger.exception("closing the engine failed")

    def _drain_inbox(self) -> None:
        while self._inbox:
            verb, arg = self._inbox.popleft()
            if verb == "add":
                self._add(arg)
            elif verb == "abort":
                self._queued.discard(arg)
                req = self.engine.abort_request(arg)
                if req is not None:
                    self.metrics.finished(RequestStatus.FINISHED_ABORTED.value)
                    self.metrics.e2e.observe(time.monotonic() - req.arrival_time)
                self._requests.pop(arg, None)

    def _add(self, sub: _Submission) -> None:
        if sub.req_id not in self._streams:  # abandoned while queued
            self._queued.discard(sub.req_id)
            return
        try:
            make = self.engine.make_request if sub.kind == "generation" else self.engine.make_likelihood_request
            req = make(sub.req_id, *sub.args, arrival_time=sub.arrival_time)
            self.engine.add(req)
        except Exception as e:  # one bad request fails alone
            logger.warning("request %s could not be queued: %s", sub.req_id, e)
            self._queued.discard(sub.req_id)
            self._deliver_all([RequestOutput(sub.req_id, [], [], True, "error", f"{type(e).__name__}: {e}")])
            return
        self._requests[sub.req_id] = req

    def _record_step(self, seconds: float, outputs: list[RequestOutput]) -> None:
        m = self.metrics
        stats = self.engine.last_step
        m.steps.inc()
        m.step_time.observe(seconds)
        m.batch_size.observe(stats.num_seqs)
        m.committed.inc(stats.num_committed)
        m.committed_per_step.observe(stats.num_committed)
        for rid in stats.admitted:
            self._queued.discard(rid)
            req = self._requests.get(rid)
            if req is not None:
                m.queue_time.observe(time.monotonic() - req.arrival_time)
        self._publish_queue()

    def _publish_queue(self) -> None:
        s = self.engine.scheduler
        self.metrics.set_queue(len(s.running), len(s.waiting) + sum(1 for v, _ in list(self._inbox) if v == "add"))

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs: metrics for all, then one hand-over per
        caller event loop carrying what each caller wants."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            self._account(out)
            if not (out.new_token_ids or out.finished or out.req_id in self._every_step):
                continue
            stream = self._streams.get(out.req_id)
            if stream is not None:
                batches.setdefault(stream[0], []).append((stream[1], out))
            if out.finished:  # a stream never iterated leaves nothing behind
                self._forget(out.req_id)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the callers' loop is closed: they are gone
                pass

    def _account(self, out: RequestOutput) -> None:
        m = self.metrics
        req = self._requests.get(out.req_id)
        if out.new_token_ids:
            m.generation_tokens.inc(len(out.new_token_ids))
            if req is not None and req.first_token_time is not None and len(out.token_ids) == len(out.new_token_ids):
                m.ttft.observe(req.first_token_time - req.arrival_time)
        if out.finished:
            self._queued.discard(out.req_id)
            m.finished(out.finish_reason)
            if req is not None:
                m.e2e.observe(time.monotonic() - req.arrival_time)
            self._requests.pop(out.req_id, None)

    def _send(self, req_id: str, item: object) -> None:
        stream = self._streams.get(req_id)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: it is gone
                pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
