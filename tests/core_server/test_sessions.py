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


def _commit(seg) -> None:
    seg.session.commit(seg)  # as DecoderStack.step does after its forward


def test_sessions_grow_by_doubling_up_to_the_limit() -> None:
    t = _table()
    seg = t.admit("a" * 16, 0, 10)
    assert seg.session.capacity == 256
    _commit(seg)
    _commit(seg := t.admit("a" * 16, 10, 300))
    assert seg.session.capacity == 512
    _commit(seg := t.admit("a" * 16, 310, 600))
    assert seg.session.capacity == 1000 and seg.session.length == 910


def test_limits_are_named_in_the_errors() -> None:
    t = _table()
    with pytest.raises(PayloadTooLarge, match="max_tokens_per_session is 1000"):
        t.admit("a" * 16, 0, 1001)
    assert len(t) == 0, "a refused first step creates no session"
    _commit(t.admit("a" * 16, 0, 1))
    t.admit("b" * 16, 0, 1)
    with pytest.raises(RateLimited, match="max_sessions=2"):
        t.admit("c" * 16, 0, 1)
    with pytest.raises(NotFound, match="unknown session"):
        t.admit("d" * 16, 5, 1)
    with pytest.raises(Conflict, match="past the session length"):
        t.admit("a" * 16, 7, 1)


def test_close_and_idle_expiry_free_slots() -> None:
    clock = Clock()
    t = _table(clock, idle_seconds=30)
    t.admit("a" * 16, 0, 1)
    t.admit("b" * 16, 0, 1)
    assert t.close("a" * 16) and not t.close("a" * 16)
    with pytest.raises(NotFound):
        t.admit("a" * 16, 1, 1)
    clock.now += 29
    assert t.expire_idle() == 0
    clock.now += 2
    assert t.expire_idle() == 1 and len(t) == 0
    t.admit("c" * 16, 0, 1)
    clock.now += 10
    t.admit("d" * 16, 0, 1)
    clock.now += 25  # c idle 35 s, d idle 25 s
    t.admit("e" * 16, 0, 1)  # a full table makes room by expiring idle sessions first
    assert len(t) == 2
    with pytest.raises(NotFound):
        t.admit("c" * 16, 1, 1)


def test_a_step_keeps_its_session_alive() -> None:
    clock = Clock()
    t = _table(clock, idle_seconds=30)
    _commit(t.admit("a" * 16, 0, 1))
    for _ in range(3):
        clock.now += 20
        _commit(t.admit("a" * 16, 1, 1))
    assert t.expire_idle() == 0
