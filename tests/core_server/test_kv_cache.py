import time

import pytest
import torch

from core_server.sessions import SessionTable
from veil.errors import Conflict, NotFound, PayloadTooLarge, RateLimited
from veil.model.kv import SessionStatus


def _table(**kw) -> SessionTable:
    args = dict(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                max_sessions=2, max_tokens=1000, idle_seconds=60)
    args.update(kw)
    return SessionTable(**args)


def test_sessions_grow_by_doubling_up_to_the_limit() -> None:
    t = _table()
    s = t.admit("a" * 16, 0, 10)
    assert s.capacity == 256
    s.length = 10
    t.admit("a" * 16, 10, 300)
    assert s.capacity == 512
    s.length = 310
    t.admit("a" * 16, 310, 600)
    assert s.capacity == 1000


def test_limits_are_named_in_the_errors() -> None:
    t = _table()
    with pytest.raises(PayloadTooLarge, match="max_tokens_per_session is 1000"):
        t.admit("a" * 16, 0, 1001)
    t.admit("a" * 16, 0, 1)
    t.admit("b" * 16, 0, 1)
    with pytest.raises(RateLimited, match="max_sessions=2"):
        t.admit("c" * 16, 0, 1)
    with pytest.raises(NotFound, match="unknown session"):
        t.admit("d" * 16, 5, 1)
    with pytest.raises(Conflict, match="past the session length"):
        t.admit("a" * 16, 7, 1)


def test_close_and_idle_expiry_free_slots() -> None:
    t = _table(idle_seconds=0.05)
    a = t.admit("a" * 16, 0, 1)
    t.admit("b" * 16, 0, 1)
    assert t.close("a" * 16) and a.status is SessionStatus.CLOSED and not t.close("a" * 16)
    time.sleep(0.1)
    assert t.expire_idle() == 1 and len(t) == 0
    t.admit("c" * 16, 0, 1)
    t.admit("d" * 16, 0, 1)
    time.sleep(0.1)
    t.admit("e" * 16, 0, 1)  # a full table makes room by expiring idle sessions first
    assert len(t) == 1
