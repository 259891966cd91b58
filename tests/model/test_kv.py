"""The one session rule: begin() checks, rolls back and makes room; step() commits after the forward."""

import pytest
import torch

from veil.errors import Conflict, PayloadTooLarge
from veil.model.decoder import DecoderStack
from veil.model.kv import MIN_CAPACITY, Session


def _session(limit: int = 1000, capacity: int = 0) -> Session:
    return Session(2, 2, 4, dtype=torch.float32, device=torch.device("cpu"), limit=limit, capacity=capacity)


def test_begin_rolls_back_and_commit_sets_the_length() -> None:
    s = _session()
    seg = s.begin(0, 10)
    assert (seg.offset, seg.n, seg.end) == (0, 10, 10) and s.length == 0 and s.capacity == MIN_CAPACITY
    s.commit(seg)
    assert s.length == 10
    s.commit(s.begin(4, 2))  # a rollback to 4, then two positions
    assert s.length == 6


def test_begin_refuses_gaps_and_the_limit() -> None:
    s = _session(limit=300)
    s.commit(s.begin(0, 5))
    with pytest.raises(Conflict, match="past the session length 5"):
        s.begin(6, 1)
    with pytest.raises(PayloadTooLarge, match="limit is 300"):
        s.begin(5, 296)
    assert s.length == 5, "a refused step changes nothing"
    s.commit(s.begin(5, 295))
    assert s.capacity == 300 and s.length == 300


def test_fork_copies_the_valid_prefix() -> None:
    s = _session(limit=8, capacity=8)
    s.k[:, :, :3] = 1.0
    s.length = 3
    twin = s.fork()
    assert twin.length == 3 and twin.capacity == 8 and torch.equal(twin.k[:, :, :3], s.k[:, :, :3])
    twin.k[:, :, 0] = 2.0
    assert float(s.k[0, 0, 0, 0]) == 1.0


def test_a_failed_forward_commits_nothing(tiny_bundles) -> None:
    _, _, core = tiny_bundles["llama"]
    stack = DecoderStack.load(core, torch.device("cpu"))
    s = stack.new_session(limit=64)
    stack.step(torch.randn(4, 64), [s.begin(0, 4)])
    assert s.length == 4
    with pytest.raises((AssertionError, RuntimeError)):
        stack.step(torch.randn(1, 63), [s.begin(4, 1)])  # wrong width: the forward fails
    assert s.length == 4
    with pytest.raises(AssertionError, match="one segment per session"):
        stack.step(torch.randn(2, 64), [s.begin(4, 1), s.begin(4, 1)])
