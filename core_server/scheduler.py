"""Continuous batching: one runner thread gathers waiting steps of many sessions into one forward."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable

import torch

from core_server.engine import CoreEngine, EngineStep
from core_server.metrics import CoreMetrics
from core_server.sessions import SessionTable
from veil.errors import InvalidRequest, ServiceUnavailable, VeilError
from veil.model.kv import Segment
from veil.wire import StepRequest, StepResult

log = logging.getLogger("veil.core.scheduler")
SWEEP_SECONDS = 1.0  # how often idle sessions are expired


@dataclasses.dataclass(slots=True)
class _Pending:
    req: StepRequest
    future: concurrent.futures.Future[StepResult]
    enqueued: float  # perf_counter, for the queue-time metric


class StepScheduler:
    """Owns the queue of steps and the thread that runs them; sessions live in `table`."""

    def __init__(self, engine: CoreEngine, table: SessionTable, metrics: CoreMetrics, max_batch_tokens: int,
                 max_queued: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.engine, self.table, self.metrics = engine, table, metrics
        self.max_batch_tokens, self.max_queued = max_batch_tokens, max_queued
        self.failure: str | None = None  # set when the runner cannot go on; /readyz then says so
        self.clock = clock
        metrics.active_sessions.set_function(table.holding_kv)  # read at scrape time, never stale
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._last_sweep = clock()

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="veil-core-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in hand, then refuse what waits and whatever comes (503 draining)."""
        with self._cond:
            self._running = False
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._fail_waiting("the core is shutting down; its sessions went to the locker", "draining")

    def enqueue(self, req: StepRequest) -> concurrent.futures.Future[StepResult]:
        """Queue a step; the future resolves once a batch has run it."""
        fut: concurrent.futures.Future[StepResult] = concurrent.futures.Future()
        with self._cond:
            if self.failure is not None:
                raise ServiceUnavailable(self.failure, code="runner_failed")
            if self._stopped:
                raise ServiceUnavailable("the core is shutting down", code="draining")
            if len(self._waiting) >= self.max_queued:
                self.metrics.errors.labels(code="queue_full").inc()
                raise ServiceUnavailable(f"the core's step queue is full (max_queued_steps={self.max_queued})",
                                         code="queue_full", headers={"retry-after": "1"})
            self._waiting.append(_Pending(req, fut, time.perf_counter()))
            self.metrics.queued_steps.set(len(self._waiting))
            self._cond.notify()
        return fut

    async def submit(self, req: StepRequest) -> StepResult:
        return await asyncio.wrap_future(self.enqueue(req))

    def take_batch(self) -> list[_Pending]:
        """Waiting steps in arrival order up to the token budget, at most one per session (its steps are
        sequential); the rest keep their places."""
        with self._cond:
            batch: list[_Pending] = []
            skipped: list[_Pending] = []
            sessions: set[str] = set()
            tokens = 0
            while self._waiting:
                item = self._waiting.popleft()
                n = item.req.hidden.shape[0]
                if item.req.session in sessions or (batch and tokens + n > self.max_batch_tokens):
                    skipped.append(item)
                    continue
                if not item.future.set_running_or_notify_cancel():
                    continue  # its client went away while it waited
                batch.append(item)
                sessions.add(item.req.session)
                tokens += n
            self._waiting.extendleft(reversed(skipped))
            self.metrics.queued_steps.set(len(self._waiting))
        return batch

    def tick(self) -> int:
        """One round of the runner: expire idle sessions when due, then run one batch; -> steps taken."""
        if self.clock() - self._last_sweep >= SWEEP_SECONDS:
            expired = self.table.expire_idle()
            if expired:
                log.info("expired idle sessions count=%d", expired)
            self._last_sweep = self.clock()
        batch = self.take_batch()
        if batch:
            self.run_batch(batch)
        return len(batch)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._running and not self._waiting:
                        self._cond.wait(timeout=SWEEP_SECONDS)
                    if not self._running:
                        return
                self.tick()
        except BaseException as exc:  # the runner is gone: say so and fail whatever still waits
            self._fail(f"the core's runner stopped ({type(exc).__name__}); restart the core")
            log.critical("runner stopped error=%s", type(exc).__name__, exc_info=True)

    def _fail(self, reason: str) -> None:
        with self._cond:
            self.failure = reason
        self.metrics.ready.set(0)
        self._fail_waiting(reason, "runner_failed")

    def _fail_waiting(self, reason: str, code: str) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for item in waiting:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(ServiceUnavailable(reason, code=code))

    def _admit(self, item: _Pending) -> Segment | None:
        """The step's segment, or None after failing its future with the reason."""
        try:
            if item.req.hidden.shape[1] != self.engine.spec.hidden_size:
                raise InvalidRequest(
                    f"step dim {item.req.hidden.shape[1]} does not match the model dim {self.engine.spec.hidden_size}",
                    code="dim_mismatch")
            return self.table.admit(item.req.session, item.req.offset, item.req.hidden.shape[0])
        except VeilError as exc:
            self.metrics.errors.labels(code=str(exc.code)).inc()
            item.future.set_exception(exc)
            return None

    def run_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        admitted = [(item, seg) for item in batch if (seg := self._admit(item)) is not None]
        if not admitted:
            return
        computed = self.engine.rows_computed
        try:
            results = self.engine.run([EngineStep(item.req.hidden, seg, item.req.want) for item, seg in admitted])
        except Exception as exc:  # out of memory or any other failure costs this batch only
            log.error("forward failed engine=%s error=%s steps=%d", self.engine.name, type(exc).__name__,
                      len(admitted))
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()  # hand back what the failed forward held
            for item, _ in admitted:
                self.metrics.errors.labels(code="forward_failed").inc()
                item.future.set_exception(VeilError("the core failed to run this step", code="forward_failed"))
            return
        compute_ms = (time.perf_counter() - started) * 1000
        self.metrics.rows_computed.inc(self.engine.rows_computed - computed)
        self.metrics.batch_tokens.observe(sum(seg.n for _, seg in admitted))
        for (item, seg), hidden in zip(admitted, results):
            self.metrics.tokens.labels(kind="prefill" if seg.n > 1 else "decode").inc(seg.n)
            self.metrics.step_seconds.observe(time.perf_counter() - item.enqueued)
            queue_ms = (started - item.enqueued) * 1000
            item.future.set_result(StepResult(item.req.session, seg.session.length, hidden, compute_ms, queue_ms))
