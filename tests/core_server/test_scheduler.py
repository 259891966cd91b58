"""The step scheduler without threads or HTTP: batching rules, one step per session, expiry on an injected clock."""

from __future__ import annotations

import concurrent.futures
import time
import types
from typing import Sequence

import pytest
import torch

from core_server.engine import EngineStep
from core_server.metrics import CoreMetrics
from core_server.scheduler import SWEEP_SECONDS, StepScheduler
from core_server.sessions import SessionTable
from veil.errors import InvalidRequest, NotFound, ServiceUnavailable, VeilError
from veil.model.kv import Session
from veil.wire import StepRequest

DIM = 8


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class RecordingEngine:
    """Stands in for an engine: out = 2·x, and it records each batch as (offset, n) per segment."""

    name = "recording"
    rows_computed = 0
    verifies_drafts = True
    spec = types.SimpleNamespace(hidden_size=DIM)
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.fail_next = False

    def new_session(self, limit: int) -> Session:
        return Session(1, 1, 2, dtype=torch.float32, device=torch.device("cpu"), limit=limit)

    def run(self, steps: Sequence[EngineStep]) -> list[torch.Tensor]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory")
        self.batches.append([(s.segment.offset, s.segment.n) for s in steps])
        for s in steps:
            s.segment.session.commit(s.segment)
        return [2 * s.hidden[[w % s.segment.n for w in s.want]] for s in steps]


@pytest.fixture()
def parts():
    clock, stack = Clock(), RecordingEngine()
    table = SessionTable(stack.new_session, max_sessions=8, max_tokens=100, idle_seconds=30, clock=clock)
    for s in "abcde":  # as the handshakes of five sessions do
        table.open(s * 16, "edge", 8, None)
    scheduler = StepScheduler(stack, table, CoreMetrics(), max_batch_tokens=16, max_queued=4,  # type: ignore[arg-type]
                              clock=clock)
    return scheduler, stack, table, clock


def _req(session: str, offset: int, rows: int, want: list[int] | None = None) -> StepRequest:
    hidden = torch.arange(rows * DIM, dtype=torch.float32).view(rows, DIM) + offset
    return StepRequest(session * 16, offset, hidden, want or [-1], bundle_id="b" * 32)


def test_steps_of_different_sessions_share_one_forward(parts) -> None:
    scheduler, stack, _, _ = parts
    a = scheduler.enqueue(_req("a", 0, 5, want=[0, -1]))
    b = scheduler.enqueue(_req("b", 0, 3))
    assert scheduler.tick() == 2 and stack.batches == [[(0, 5), (0, 3)]]
    ra, rb = a.result(timeout=0), b.result(timeout=0)
    assert ra.length == 5 and torch.equal(ra.hidden, 2 * _req("a", 0, 5).hidden[[0, 4]])
    assert rb.length == 3 and torch.equal(rb.hidden, 2 * _req("b", 0, 3).hidden[[2]])


def test_one_step_per_session_per_batch_in_arrival_order(parts) -> None:
    scheduler, stack, _, _ = parts
    first = scheduler.enqueue(_req("a", 0, 4))
    second = scheduler.enqueue(_req("a", 4, 1))
    other = scheduler.enqueue(_req("b", 0, 2))
    assert scheduler.tick() == 2 and stack.batches[-1] == [(0, 4), (0, 2)]
    assert not second.done()
    assert scheduler.tick() == 1 and stack.batches[-1] == [(4, 1)]
    assert first.result(timeout=0).length == 4 and second.result(timeout=0).length == 5
    assert other.result(timeout=0).length == 2


def test_the_token_budget_splits_batches_but_never_starves_a_big_step(parts) -> None:
    scheduler, stack, _, _ = parts
    futures = [scheduler.enqueue(_req(s, 0, n)) for s, n in (("a", 20), ("b", 10), ("c", 6), ("d", 1))]
    assert scheduler.tick() == 1 and stack.batches[-1] == [(0, 20)]  # over budget alone: runs alone
    assert scheduler.tick() == 2 and stack.batches[-1] == [(0, 10), (0, 6)]  # 16 tokens: the budget is full
    assert scheduler.tick() == 1 and stack.batches[-1] == [(0, 1)]
    assert all(f.done() and f.exception() is None for f in futures)
    assert sum(n for batch in stack.batches for _, n in batch) == 37


def test_a_refused_step_fails_alone(parts) -> None:
    scheduler, stack, _, _ = parts
    lost = scheduler.enqueue(_req("a", 7, 1))  # the core never saw session a
    wide = scheduler.enqueue(StepRequest("b" * 16, 0, torch.zeros(1, DIM + 1), bundle_id="b" * 32))
    fine = scheduler.enqueue(_req("c", 0, 2))
    scheduler.tick()
    assert isinstance(lost.exception(timeout=0), NotFound)
    assert isinstance(wide.exception(timeout=0), InvalidRequest)
    assert fine.result(timeout=0).length == 2 and stack.batches == [[(0, 2)]]


def test_a_failed_forward_fails_its_batch_and_the_runner_goes_on(parts) -> None:
    scheduler, stack, table, _ = parts
    stack.fail_next = True
    doomed = scheduler.enqueue(_req("a", 0, 2))
    scheduler.tick()
    exc = doomed.exception(timeout=0)
    assert isinstance(exc, VeilError) and exc.code == "forward_failed"
    again = scheduler.enqueue(_req("a", 0, 2))
    scheduler.tick()
    assert again.result(timeout=0).length == 2


def test_a_step_whose_client_left_is_dropped(parts) -> None:
    scheduler, stack, _, _ = parts
    gone = scheduler.enqueue(_req("a", 0, 2))
    assert gone.cancel()
    kept = scheduler.enqueue(_req("b", 0, 2))
    scheduler.tick()
    assert stack.batches == [[(0, 2)]] and kept.result(timeout=0).length == 2
    with pytest.raises(concurrent.futures.CancelledError):
        gone.result(timeout=0)


def test_idle_sessions_expire_when_the_sweep_is_due(parts) -> None:
    scheduler, _, table, clock = parts
    scheduler.enqueue(_req("a", 0, 2))
    scheduler.tick()
    clock.now += 31  # idle past idle_seconds, and a sweep is due
    assert clock.now - scheduler._last_sweep >= SWEEP_SECONDS
    scheduler.tick()
    assert len(table) == 0
    late = scheduler.enqueue(_req("a", 2, 1))
    scheduler.tick()
    assert isinstance(late.exception(timeout=0), NotFound)


def test_the_queue_is_bounded(parts) -> None:
    scheduler, _, _, _ = parts
    for s in "abcd":
        scheduler.enqueue(_req(s, 0, 1))
    with pytest.raises(ServiceUnavailable) as full:
        scheduler.enqueue(_req("e", 0, 1))
    assert full.value.code == "queue_full" and full.value.headers == {"retry-after": "1"}
    scheduler.tick()
    scheduler.enqueue(_req("e", 0, 1))  # room again once a batch ran


def test_a_runner_that_cannot_go_on_says_so(parts, monkeypatch) -> None:
    scheduler, _, table, clock = parts

    def broken() -> int:
        raise MemoryError()

    monkeypatch.setattr(table, "expire_idle", broken)
    clock.now += SWEEP_SECONDS  # the next round sweeps, and the sweep fails outside any batch
    waiting = scheduler.enqueue(_req("a", 0, 1))
    scheduler.start()
    exc = waiting.exception(timeout=10)
    assert isinstance(exc, ServiceUnavailable) and exc.code == "runner_failed"
    assert scheduler.failure is not None and "MemoryError" in scheduler.failure
    with pytest.raises(ServiceUnavailable, match="runner stopped"):
        scheduler.enqueue(_req("b", 0, 1))
    scheduler.stop()


def _running(parts, wait_ms: float, first: str = "") -> StepScheduler:
    """A started scheduler over the fixture's engine and table, with the given gathering wait, after one batch
    that ran a one-row step of each session in `first` together."""
    _, stack, table, clock = parts
    scheduler = StepScheduler(stack, table, CoreMetrics(), max_batch_tokens=16, clock=clock,  # type: ignore[arg-type]
                              batch_wait_ms=wait_ms)
    steps = [scheduler.enqueue(_req(s, 0, 1)) for s in first]  # queued before the runner starts: one batch
    scheduler.start()
    for f in steps:
        f.result(timeout=5)
    return scheduler


def test_the_runner_gathers_the_sessions_of_the_last_batch_into_one_forward(parts) -> None:
    stack = parts[1]
    scheduler = _running(parts, wait_ms=60_000, first="ab")
    try:
        a = scheduler.enqueue(_req("a", 1, 1))
        time.sleep(0.2)  # b's edge answers later: without gathering, a would run alone meanwhile
        assert not a.done()
        b = scheduler.enqueue(_req("b", 1, 1))
        a.result(timeout=5), b.result(timeout=5)  # both arrived: no waiting out the 60 s
    finally:
        scheduler.stop()
    assert stack.batches == [[(0, 1), (0, 1)], [(1, 1), (1, 1)]]


def test_one_stream_alone_never_waits_and_a_missing_session_only_delays_by_the_wait(parts) -> None:
    stack = parts[1]
    scheduler = _running(parts, wait_ms=60_000)
    try:
        for offset in range(3):  # nobody else took part in its last batch: no wait (else 60 s and a timeout)
            scheduler.enqueue(_req("a", offset, 1)).result(timeout=5)
    finally:
        scheduler.stop()
    bounded = _running(parts, wait_ms=50, first="cd")
    try:
        bounded.enqueue(_req("c", 1, 1)).result(timeout=5)  # d never comes back (its client left)
        bounded.enqueue(_req("c", 2, 1)).result(timeout=5)
    finally:
        bounded.stop()
    assert stack.batches[-3:] == [[(0, 1), (0, 1)], [(1, 1)], [(2, 1)]]


def test_without_a_wait_a_batch_starts_with_whatever_waits(parts) -> None:
    stack = parts[1]
    scheduler = _running(parts, wait_ms=0, first="ab")
    try:
        scheduler.enqueue(_req("a", 1, 1)).result(timeout=5)
    finally:
        scheduler.stop()
    assert stack.batches == [[(0, 1), (0, 1)], [(1, 1)]]


def test_batch_groups_split_the_sessions_holding_kv_into_alternating_forwards(parts) -> None:
    scheduler, stack, table, _ = parts
    grouped = StepScheduler(stack, table, CoreMetrics(), max_batch_tokens=16, batch_groups=2)  # type: ignore[arg-type]
    assert grouped.row_budget() == 1  # no session holds a KV cache yet
    firsts = [grouped.enqueue(_req(s, 0, 1)) for s in "abcd"]
    assert grouped.row_budget() == 2  # four sessions wait for their first step
    assert grouped.tick() == 2 and grouped.tick() == 2
    assert table.holding_kv() == 4 and grouped.row_budget() == 2
    decodes = [grouped.enqueue(_req(s, 1, 1)) for s in "abcd"]
    assert grouped.tick() == 2 and grouped.tick() == 2  # two groups of two, one forward each
    assert stack.batches[-2:] == [[(1, 1), (1, 1)], [(1, 1), (1, 1)]]
    assert all(f.done() for f in firsts + decodes)
    big = grouped.enqueue(_req("e", 0, 5))  # a step larger than the budget still runs
    assert grouped.tick() == 1 and big.result(timeout=0).length == 5
