"""AsyncEngine: one engine loop in a background thread, many asyncio callers.

The loop thread owns the LLMEngine (loads it, then steps it whenever there is
work). Callers hand requests in through a thread-safe inbox and get their
outputs back through a per-request asyncio queue. A caller that goes away
(cancelled, client disconnected) aborts its request, which leaves the batch
before the next step. A failure inside one request fails that request alone;
if the loop itself dies, every caller gets an error, ``is_dead`` turns true
and ``on_fatal`` is called so the process can exit non-zero.

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
from typing import TYPE_CHECKING, AsyncIterator, Callable

from sampler.params import DiffusionParams, LikelihoodParams
from server.engine.messages import RequestOutput
from server.engine.likelihood import LikelihoodRequest
from server.engine.request import Request, RequestStatus
from server.metrics import Metrics

if TYPE_CHECKING:  # the engine (torch) is only built in the loop thread
    from server.engine.engine import LLMEngine

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has died; the server must be restarted."""


class QueueFullError(RuntimeError):
    """The waiting queue is at max_queued_requests."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], "LLMEngine"], metrics: Metrics, max_queued_requests: int = 256,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self._factory = engine_factory
        self.metrics = metrics
        self.max_queued_requests = max_queued_requests
        self.on_fatal = on_fatal
        self.engine = None  # set by the loop thread once loaded
        self.dead: BaseException | None = None
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._requests: dict[str, Request] = {}  # live requests, by req_id
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._every_step: set[str] = set()  # req_ids whose caller wants every step's output
        self._thread = threading.Thread(target=self._run, name="llada-engine", daemon=True)

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
        return self.engine is not None and self.dead is None

    @property
    def is_dead(self) -> bool:
        return self.dead is not None

    @property
    def num_waiting(self) -> int:
        return sum(1 for r in list(self._requests.values()) if r.status == RequestStatus.WAITING)

    # -- callers (event loop thread) -----------------------------------------------
    def make_request(self, req_id: str, prompt_ids: list[int], params: DiffusionParams) -> Request:
        """Validates a request (ValueError naming the field) without queueing it."""
        self._check_alive()
        return self.engine.make_request(req_id, prompt_ids, params)

    def make_likelihood_request(self, req_id: str, context_ids: list[int], continuation_ids: list[int],
                                params: LikelihoodParams) -> LikelihoodRequest:
        """Validates a likelihood request (ValueError naming the field) without queueing it."""
        self._check_alive()
        return self.engine.make_likelihood_request(req_id, context_ids, continuation_ids, params)

    def submit(self, req: Request | LikelihoodRequest, every_step: bool = False) -> AsyncIterator[RequestOutput]:
        """Queues ``req`` now (raising QueueFullError, EngineDeadError or
        EngineNotReadyError at once) and returns the iterator of its outputs,
        which ends with the finished one: those that add final tokens, or
        with ``every_step`` one per step. Leaving the iteration early aborts
        the request; so does ``abort`` for a stream never iterated."""
        self._check_alive()
        if self.num_waiting >= self.max_queued_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_queued_requests} requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[req.req_id] = (asyncio.get_running_loop(), queue)
        self._requests[req.req_id] = req
        if every_step:
            self._every_step.add(req.req_id)
        if self.dead is not None:  # the loop died between the check and the registration
            self._forget(req.req_id)
            self._check_alive()
        self.metrics.prompt_tokens.inc(req.prompt_len)
        self.metrics.request(req.kind)
        self._post("add", req)
        return self._outputs(req.req_id, queue)

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

    def abort(self, req_id: str, reason: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """Stops a request before the engine's next step (``reason`` is what
        the metrics record: an abort, or a stop string found by the caller)."""
        self._forget(req_id)
        self._post("abort", (req_id, reason))

    def _forget(self, req_id: str) -> None:
        self._streams.pop(req_id, None)
        self._every_step.discard(req_id)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead}")
        if self.engine is None:
            raise EngineNotReadyError("the model is still loading")

    def _post(self, verb: str, arg: object) -> None:
        self._inbox.append((verb, arg))
        self._wake.set()

    # -- the loop (engine thread) -------------------------------------------------------
    def _run(self) -> None:
        error: BaseException = EngineDeadError("the engine was shut down")
        try:
            self.engine = self._factory()
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
        except BaseException as e:  # the loop itself broke: nothing can be served any more
            logger.exception("engine loop died")
            self.dead = error = e
            if self.on_fatal is not None:
                self.on_fatal(e)
        finally:  # no stream is left waiting, whether the loop died or was shut down
            for rid in list(self._streams):
                self._send(rid, EngineDeadError(f"the engine loop has stopped: {error}"))

    def _drain_inbox(self) -> None:
        while self._inbox:
            verb, arg = self._inbox.popleft()
            if verb == "add":
                if arg.req_id not in self._streams:  # abandoned while queued
                    self._requests.pop(arg.req_id, None)
                    continue
                try:
                    self.engine.scheduler.add(arg)
                except Exception as e:  # one bad request fails alone
                    logger.exception("request %s could not be queued", arg.req_id)
                    self._deliver_all([RequestOutput(arg.req_id, [], [], True, "error", f"{type(e).__name__}: {e}")])
            elif verb == "abort":
                req_id, reason = arg
                req = self.engine.scheduler.abort(req_id, reason)
                if req is not None:
                    self.metrics.finished(reason.value)
                    self.metrics.e2e.observe(time.monotonic() - req.arrival_time)
                self._requests.pop(req_id, None)

    def _record_step(self, seconds: float, outputs: list[RequestOutput]) -> None:
        m = self.metrics
        stats = self.engine.last_step
        m.steps.inc()
        m.step_time.observe(seconds)
        m.batch_size.observe(stats.num_seqs)
        m.committed.inc(stats.num_committed)
        m.committed_per_step.observe(stats.num_committed)
        for rid in stats.admitted:
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
