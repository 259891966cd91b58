"""Continuous batching: one runner thread gathers waiting steps of many sessions into one forward.

Chunked prefill: a step longer than `prefill_chunk_tokens` rows runs as several chunks, one per batch, each
admitted at its own offset; the other sessions' steps share those batches instead of waiting for one long
forward. Its future resolves once, after the last chunk, with the result the whole step would have had.

Gathering: a decode forward reads every weight once whatever its rows, so one forward of 16 rows costs about
what one of 2 does. The sessions of a batch come back as their edge answers them, one HTTP request each, a few
milliseconds apart; starting the next forward with the first arrivals would split them over several forwards.
So while sessions that took part in the last batch are still missing, the runner holds the batch back, for at
most `batch_wait_ms` after its oldest step arrived. One stream alone never waits: nobody is missing.

Groups: where the edge runs on the same CPU cores as the core, a forward of every stream leaves the edge idle
while it runs, and the core idle while the edge samples and sends all of them. With `batch_groups` N a forward
takes at most 1/N of the live sessions (holding a KV cache or with a step waiting), so the groups' forwards
alternate with the edge's work on the others instead of waiting for it.
"""

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
    done: int = 0  # rows already run (committed) by earlier chunks
    rows: int = 0  # rows of the chunk in hand, set by take_batch
    picked: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # wanted rows from earlier chunks
    compute_ms: float = 0.0  # summed over the chunks run so far

    @property
    def size(self) -> int:
        return self.req.hidden.shape[0]

    @property
    def whole(self) -> bool:
        return self.done == 0 and self.rows == self.size

    @property
    def last(self) -> bool:
        return self.done + self.rows == self.size

    def _inside(self) -> list[int]:
        """The step's wanted rows that fall in the chunk in hand, as indices into the chunk."""
        n, lo = self.size, self.done
        return sorted({w % n - lo for w in self.req.want if lo <= w % n < lo + self.rows})

    def chunk_want(self) -> list[int]:
        # an engine is always asked for at least one row: a chunk holding none of the wanted ones asks its last
        return self._inside() or [self.rows - 1]

    def keep(self, hidden: torch.Tensor) -> None:
        """Hold the wanted rows of the chunk just run (hidden: [len(chunk_want), d])."""
        for i, row in zip(self._inside(), hidden):
            self.picked[self.done + i] = row

    def gathered(self) -> torch.Tensor:
        """[len(want), d]: the wanted rows in the order asked, as the whole step would have returned them."""
        return torch.stack([self.picked[w % self.size] for w in self.req.want])


class StepScheduler:
    """Owns the queue of steps and the thread that runs them; sessions live in `table`."""

    def __init__(self, engine: CoreEngine, table: SessionTable, metrics: CoreMetrics, max_batch_tokens: int,
                 max_queued: int = 1024, clock: Callable[[], float] = time.monotonic, prefill_chunk_tokens: int = 0,
                 batch_wait_ms: float = 0.0, batch_groups: int = 1):
        self.engine, self.table, self.metrics = engine, table, metrics
        self.max_batch_tokens, self.max_queued = max_batch_tokens, max_queued
        self.batch_groups = batch_groups  # 1: a forward takes whatever waits, up to max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: every step runs whole
        self.batch_wait = batch_wait_ms / 1000  # 0: a batch starts with whatever waits
        self._expected: set[str] = set()  # sessions whose step the last batch finished: likely back soon
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

    def row_budget(self) -> int:
        """Rows one forward may take: max_batch_tokens, within a group's share of the live sessions (holding a
        KV cache or with a step waiting) when there are several groups."""
        if self.batch_groups == 1:
            return self.max_batch_tokens
        with self._cond:
            live = self.table.live({p.req.session for p in self._waiting})
        return min(self.max_batch_tokens, max(1, -(-live // self.batch_groups)))

    def take_batch(self) -> list[_Pending]:
        """Waiting steps (or their next chunk) in arrival order up to the token budget, at most one per session
        (its steps are sequential); the rest keep their places. A step part-way through its chunks waits at the
        front, so it is never starved."""
        with self._cond:
            batch: list[_Pending] = []
            skipped: list[_Pending] = []
            sessions: set[str] = set()  # taken or passed over: a later step of theirs must not overtake
            tokens, budget = 0, self.row_budget()
            while self._waiting:
                item = self._waiting.popleft()
                remaining = item.size - item.done
                item.rows = min(remaining, self.prefill_chunk_tokens) if self.prefill_chunk_tokens else remaining
                if item.req.session in sessions or (batch and tokens + item.rows > budget):
                    skipped.append(item)
                    sessions.add(item.req.session)
                    continue
                if not self._claim(item):
                    continue  # its client went away while it waited
                batch.append(item)
                sessions.add(item.req.session)
                tokens += item.rows
            self._waiting.extendleft(reversed(skipped))
            self.metrics.queued_steps.set(len(self._waiting))
        return batch

    def _claim(self, item: _Pending) -> bool:
        """Whether the step's client still waits. The future stays pending (cancellable) until its last chunk."""
        alive = item.future.set_running_or_notify_cancel() if item.last else not item.future.cancelled()
        if not alive and item.done:
            self.table.rewind(item.req.session, item.req.offset)
        return alive

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

    def gather(self) -> None:
        """Wait (holding the lock) while sessions of the last batch have no step waiting, until the oldest
        waiting step has waited `batch_wait`, or the waiting rows fill a batch."""
        expected, self._expected = self._expected, set()
        if not self.batch_wait or not expected or not self._waiting:
            return
        deadline = self._waiting[0].enqueued + self.batch_wait
        budget = self.row_budget()
        while self._running:
            here = {p.req.session for p in self._waiting}
            rows = sum(p.size - p.done for p in self._waiting)
            left = deadline - time.perf_counter()
            if expected <= here or left <= 0 or rows >= budget:
                return
            self._cond.wait(timeout=left)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._running and not self._waiting:
                        self._cond.wait(timeout=SWEEP_SECONDS)
                    if not self._running:
                        return
                    self.gather()
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
            if item.done:
                self.table.rewind(item.req.session, item.req.offset)
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(ServiceUnavailable(reason, code=code))

    def _fail_step(self, item: _Pending, exc: VeilError) -> None:
        """Fail the step once; a step stopped part-way leaves its session as it was before the step."""
        if item.done:
            self.table.rewind(item.req.session, item.req.offset)
        try:
            item.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # a chunk before the last: its client went away meanwhile

    def _admit(self, item: _Pending) -> Segment | None:
        """The segment of the step's chunk in hand, or None after failing its future with the reason."""
        try:
            if item.req.hidden.shape[1] != self.engine.spec.hidden_size:
                raise InvalidRequest(
                    f"step dim {item.req.hidden.shape[1]} does not match the model dim {self.engine.spec.hidden_size}",
                    code="dim_mismatch")
            return self.table.admit(item.req.session, item.req.offset + item.done, item.rows)
        except VeilError as exc:
            self.metrics.errors.labels(code=str(exc.code)).inc()
            self._fail_step(item, exc)
            return None

    @staticmethod
    def _engine_step(item: _Pending, seg: Segment) -> EngineStep:
        if item.whole:
            return EngineStep(item.req.hidden, seg, item.req.want)
        return EngineStep(item.req.hidden[item.done : item.done + item.rows], seg, item.chunk_want())

    def run_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        admitted = [(item, seg) for item in batch if (seg := self._admit(item)) is not None]
        if not admitted:
            return
        computed = self.engine.rows_computed
        try:
            results = self.engine.run([self._engine_step(item, seg) for item, seg in admitted])
        except Exception as exc:  # out of memory or any other failure costs this batch only
            log.error("forward failed engine=%s error=%s steps=%d", self.engine.name, type(exc).__name__,
                      len(admitted))
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()  # hand back what the failed forward held
            for item, _ in admitted:
                self.metrics.errors.labels(code="forward_failed").inc()
                self._fail_step(item, VeilError("the core failed to run this step", code="forward_failed"))
            return
        compute_ms = (time.perf_counter() - started) * 1000
        if self.batch_wait:
            self._expected = {item.req.session for item, seg in admitted if item.done + seg.n == item.size}
        self.metrics.rows_computed.inc(self.engine.rows_computed - computed)
        self.metrics.batch_tokens.observe(sum(seg.n for _, seg in admitted))
        unfinished: list[_Pending] = []
        for (item, seg), hidden in zip(admitted, results):
            # the step's kind, not the chunk's: a 1-row last chunk is still prefill
            self.metrics.tokens.labels(kind="prefill" if item.size > 1 else "decode").inc(seg.n)
            if item.whole:
                self.metrics.step_seconds.observe(time.perf_counter() - item.enqueued)
                queue_ms = (started - item.enqueued) * 1000
                item.future.set_result(StepResult(item.req.session, seg.session.length, hidden, compute_ms, queue_ms))
                continue
            item.keep(hidden)
            item.compute_ms += compute_ms
            item.done += seg.n
            if item.done < item.size:
                unfinished.append(item)
                continue
            # compute_ms sums the step's chunk forwards; queue_ms is the rest of its time (waits before and
            # between chunks), so the two add up to its time in the core as for a whole step
            elapsed_ms = (time.perf_counter() - item.enqueued) * 1000
            self.metrics.step_seconds.observe(elapsed_ms / 1000)
            item.future.set_result(StepResult(item.req.session, seg.session.length, item.gathered(),
                                              item.compute_ms, elapsed_ms - item.compute_ms))
        if unfinished:  # back at the front: the next batch takes their next chunks first
            with self._cond:
                self._waiting.extendleft(reversed(unfinished))
                self.metrics.queued_steps.set(len(self._waiting))
