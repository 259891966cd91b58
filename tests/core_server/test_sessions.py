"""The core's session table: limits named in the errors, close and idle expiry on an injected clock."""

import pytest
import torch

from core_server.sessions import SessionTable
from veil.errors import Conflict, NotFound, PayloadTooLarge, RateLimited
from veil.model.kv import Session


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _new_session(limit: int) -> Session:
    return Session(2, 2, 4, dtype=torch.float32, device=torch.device("cpu"), limit=limit)


def _table(clock: Clock | None = None, **kw) -> SessionTable:
    args = dict(max_sessions=2, max_tokens=1000, idle_seconds=60)
    args.update(kw)
    return SessionTable(_new_session, clock=clock or Clock(), **args)


def _open(t: SessionTable, *names: str, owner: str = "edge", quota: int = 8) -> None:
    for name in names:
        t.open(name * 16, owner, quota, None)


def _commit(seg) -> None:
    seg.session.commit(seg)  # as DecoderStack.step does after its forward


def test_sessions_grow_by_doubling_up_to_the_limit() -> None:
    t = _table()
    _open(t, "a")
    seg = t.admit("a" * 16, 0, 10)
    assert seg.session.capacity == 256
    _commit(seg)
    _commit(seg := t.admit("a" * 16, 10, 300))
    assert seg.session.capacity == 512
    _commit(seg := t.admit("a" * 16, 310, 600))
    assert seg.session.capacity == 1000 and seg.session.length == 910


def test_limits_are_named_in_the_errors() -> None:
    t = _table()
    _open(t, "a")
    with pytest.raises(PayloadTooLarge, match="max_tokens_per_session is 1000"):
        t.admit("a" * 16, 0, 1001)
    assert t.holding_kv() == 0, "a refused first step makes no cache"
    _commit(t.admit("a" * 16, 0, 1))
    _open(t, "b")
    with pytest.raises(RateLimited, match="max_sessions=2"):
        _open(t, "c")
    with pytest.raises(NotFound, match="does not hold this session"):
        t.admit("d" * 16, 5, 1)
    with pytest.raises(NotFound, match="does not hold this session"):
        t.admit("b" * 16, 5, 1)  # opened, but its first step must start at 0
    with pytest.raises(Conflict, match="past the session length"):
        t.admit("a" * 16, 7, 1)


def test_close_and_idle_expiry_free_slots() -> None:
    clock = Clock()
    t = _table(clock, idle_seconds=30)
    _open(t, "a", "b")
    assert t.close("a" * 16) and not t.close("a" * 16)
    with pytest.raises(NotFound):
        t.admit("a" * 16, 0, 1)
    clock.now += 29
    assert t.expire_idle() == 0
    clock.now += 2
    assert t.expire_idle() == 1 and len(t) == 0
    _open(t, "c")
    clock.now += 10
    _open(t, "d")
    clock.now += 25  # c idle 35 s, d idle 25 s
    _open(t, "e")  # a full table makes room by expiring idle sessions first
    assert len(t) == 2
    with pytest.raises(NotFound):
        t.admit("c" * 16, 1, 1)


def test_a_step_keeps_its_session_alive() -> None:
    clock = Clock()
    t = _table(clock, idle_seconds=30)
    _open(t, "a")
    _commit(t.admit("a" * 16, 0, 1))
    for _ in range(3):
        clock.now += 20
        _commit(t.admit("a" * 16, 1, 1))
    assert t.expire_idle() == 0


def test_each_edge_has_its_quota_and_owns_its_ids() -> None:
    t = _table(max_sessions=4)
    _open(t, "a", "b", owner="greedy", quota=2)
    with pytest.raises(RateLimited, match="quota of 2"):
        _open(t, "c", owner="greedy", quota=2)
    _open(t, "c", "d", owner="other", quota=2)  # the greedy edge left room for another
    with pytest.raises(Conflict, match="already open"):
        t.open("a" * 16, "other", 2, None, resume=True)  # another edge's id: no
    with pytest.raises(Conflict, match="already open"):
        t.open("a" * 16, "greedy", 2, None)  # a new session may not take a live id
    assert t.open("a" * 16, "greedy", 2, None, resume=True).owner == "greedy"


def test_idle_sessions_with_a_locker_key_spill_and_the_rest_expire() -> None:
    clock, spilled = Clock(), []
    t = SessionTable(_new_session, max_sessions=2, max_tokens=100, idle_seconds=60, clock=clock,
                     spill=lambda sid, held: spilled.append(sid), spill_after=10)
    _open(t, "a", "b")
    _commit(t.admit("a" * 16, 0, 3))
    t.get("a" * 16).locker_key = b"k" * 32
    _commit(t.admit("b" * 16, 0, 3))  # b has no locker key: it can only expire
    clock.now += 11
    assert t.expire_idle() == 1 and spilled == ["a" * 16] and len(t) == 1
    held = t.get("b" * 16)
    held.locker_key = b"k" * 32
    t.use(held, +1)  # a step in flight: never spilled, however full the table is
    clock.now += 11
    _open(t, "c")
    with pytest.raises(RateLimited, match="max_sessions=2"):
        _open(t, "d")
    t.use(held, -1)
    clock.now += 11
    _open(t, "d")  # now b was idle and spillable: it made room
    assert spilled == ["a" * 16, "b" * 16]
