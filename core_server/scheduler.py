"""Continuous batching: one runner thread gathers waiting steps of many sessions into one forward."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

import torch

from core_server.metrics import CoreMetrics
from core_server.sessions import SessionTable
from veil.errors import InvalidRequest, VeilError
from veil.model.decoder import DecoderStack, Segment
from veil.wire import StepRequest, StepResult

log = logging.getLogger("veil.core.scheduler")
_SWEEP_SECONDS = 1.0


@dataclasses.dataclass(slots=True)
class _Pending:
    req: StepRequest
    future: concurrent.futures.Future
    enqueued: float


class StepScheduler:
    """Owns the queue of steps and the thread that runs them; sessions live in `table`."""

    def __init__(self, stack: DecoderStack, table: SessionTable, metrics: CoreMetrics, max_batch_tokens: int):
        self.stack, self.table, self.metrics = stack, table, metrics
        self.max_batch_tokens = max_batch_tokens
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="veil-core-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def submit(self, req: StepRequest) -> StepResult:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._waiting.append(_Pending(req, fut, time.perf_counter()))
            self.metrics.queued_steps.set(len(self._waiting))
            self._cond.notify()
        return await asyncio.wrap_future(fut)

    def _take_batch(self) -> list[_Pending]:
        """Waiting steps up to the token budget, at most one per session (its steps are sequential)."""
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
            batch.append(item)
            sessions.add(item.req.session)
            tokens += n
        self._waiting.extendleft(reversed(skipped))
        return batch

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while True:
            with self._cond:
                while self._running and not self._waiting:
                    self._cond.wait(timeout=_SWEEP_SECONDS)
                    if time.monotonic() - last_sweep >= _SWEEP_SECONDS:
                        break
                if not self._running:
                    return
                batch = self._take_batch()
                self.metrics.queued_steps.set(len(self._waiting))
            if time.monotonic() - last_sweep >= _SWEEP_SECONDS:
                expired = self.table.expire_idle()
                if expired:
                    log.info("expired idle sessions count=%d", expired)
                last_sweep = time.monotonic()
            self.metrics.active_sessions.set(len(self.table))
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        segments: list[Segment] = []
        admitted: list[_Pending] = []
        row = 0
        for item in batch:
            n = item.req.hidden.shape[0]
            try:
                if item.req.hidden.shape[1] != self.stack.spec.hidden_size:
                    raise InvalidRequest(
                        f"step dim {item.req.hidden.shape[1]} does not match the model dim {self.stack.spec.hidden_size}",
                        code="dim_mismatch")
                sess = self.table.admit(item.req.session, item.req.offset, n)
            except VeilError as exc:
                self.metrics.errors.labels(code=str(exc.code)).inc()
                item.future.set_exception(exc)
                continue
            segments.append(Segment(sess, item.req.offset, row, n))
            admitted.append(item)
            row += n
        if not admitted:
            return
        x = torch.cat([item.req.hidden for item in admitted]) if len(admitted) > 1 else admitted[0].req.hidden
        try:
            out = self.stack.forward(x, segments)
        except Exception as exc:  # never let one bad batch kill the runner thread
            log.error("forward failed error=%s steps=%d", type(exc).__name__, len(admitted))
            for item in admitted:
                self.metrics.errors.labels(code="forward_failed").inc()
                item.future.set_exception(VeilError("the core failed to run this step", code="forward_failed"))
            return
        compute_ms = (time.perf_counter() - started) * 1000
        self.metrics.batch_tokens.observe(row)
        for item, seg in zip(admitted, segments):
            seg.session.length = seg.offset + seg.n
            idx = torch.tensor([seg.start + (w % seg.n) for w in item.req.want], device=out.device)
            hidden = out.index_select(0, idx).to("cpu", torch.float32)
            kind = "prefill" if seg.n > 1 else "decode"
            self.metrics.tokens.labels(kind=kind).inc(seg.n)
            queue_ms = (started - item.enqueued) * 1000
            self.metrics.step_seconds.observe((time.perf_counter() - item.enqueued))
            item.future.set_result(StepResult(seg.session.sid, seg.session.length, hidden, compute_ms, queue_ms))
