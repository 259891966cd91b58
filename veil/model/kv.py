"""One sequence's state on the core and the one rule for writing into it.

A step writes `n` new positions at `offset`: `begin` checks the offset against what the
state holds, rolls back anything after it (a re-prefill, rejected speculation) and makes
room; the engine runs the blocks and commits the new length. The state is a KV cache
(`Session`, for Veil's own stack: the core's sessions, the edge-held blocks and the privacy
audit) or the session's input rows (`Rows`, for an engine that keeps its own KV cache, such
as vLLM with prefix caching). Both grow by doubling up to their limit.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
import weakref

import torch

from veil.errors import Conflict, PayloadTooLarge, RateLimited

MIN_CAPACITY = 256  # positions allocated at first use; growth doubles from here up to the limit


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """One session's share of a batched step: n new positions starting at offset."""

    session: Positions
    offset: int
    n: int

    @property
    def end(self) -> int:
        return self.offset + self.n


class Positions:
    """What every session state shares: `length` valid positions of at most `limit`, written by segments.
    `parts` are its tensors, each with positions on axis `POSITION_AXIS` of that part (the locker seals them)."""

    __slots__ = ("length", "limit")
    POSITION_AXES: tuple[int, ...] = ()

    def __init__(self, limit: int):
        self.length = 0
        self.limit = limit  # positions this session may ever hold

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def capacity(self) -> int:
        first = self.parts[0]
        return first.shape[self.POSITION_AXES[0]]

    def begin(self, offset: int, n: int) -> Segment:
        """Check a step of n positions at offset, roll back past offset, make room (409 / 413 if it cannot)."""
        assert n > 0
        if offset > self.length:
            raise Conflict(f"step offset {offset} is past the session length {self.length}")
        if offset + n > self.limit:
            raise PayloadTooLarge(f"the session would hold {offset + n} tokens; its limit is {self.limit}",
                                  code="session_token_limit")
        self.length = offset
        if offset + n > self.capacity:  # grow by doubling (at least MIN_CAPACITY, at most the limit)
            self._set_parts(self._copies(min(max(MIN_CAPACITY, self.capacity * 2, offset + n), self.limit)))
        return Segment(self, offset, n)

    def commit(self, segment: Segment) -> None:
        """Called by the engine once the segment's positions are written."""
        assert segment.session is self and segment.offset <= self.length
        self.length = segment.end

    def valid_parts(self) -> list[torch.Tensor]:
        """Views of the parts cut to the valid positions."""
        return [p.narrow(axis, 0, self.length) for p, axis in zip(self.parts, self.POSITION_AXES)]

    def part_shapes(self, n: int) -> list[tuple[int, ...]]:
        """The shapes `valid_parts` has at length n."""
        shapes = []
        for p, axis in zip(self.parts, self.POSITION_AXES):
            shape = list(p.shape)
            shape[axis] = n
            shapes.append(tuple(shape))
        return shapes

    def _copies(self, capacity: int) -> tuple[torch.Tensor, ...]:
        """New parts of `capacity` positions holding this session's valid ones."""
        out = []
        for p, axis in zip(self.parts, self.POSITION_AXES):
            shape = list(p.shape)
            shape[axis] = capacity
            fresh = torch.empty(shape, dtype=p.dtype, device=p.device)
            fresh.narrow(axis, 0, self.length).copy_(p.narrow(axis, 0, self.length))
            out.append(fresh)
        return tuple(out)

    def _set_parts(self, parts: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError


class Session(Positions):
    """A KV cache: k, v are [layers, kv_heads, capacity, head_dim]; positions below `length` are valid."""

    __slots__ = ("k", "v")
    POSITION_AXES = (2, 2)

    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device,
                 limit: int, capacity: int = 0):
        assert 0 <= capacity <= limit
        super().__init__(limit)
        self.k = torch.empty((layers, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.k, self.v

    def _set_parts(self, parts: tuple[torch.Tensor, ...]) -> None:
        self.k, self.v = parts

    def fork(self) -> Session:
        """A copy holding the same valid positions (for beams that share a prefix)."""
        layers, kv_heads, capacity, head_dim = self.k.shape
        twin = Session(layers, kv_heads, head_dim, dtype=self.k.dtype, device=self.k.device, limit=self.limit)
        twin.length = self.length
        twin._set_parts(self._copies(capacity))
        return twin


class Rows(Positions):
    """A session's input rows [capacity, d] (rotated hidden states), for an engine that keeps the KV cache
    itself and is handed the whole sequence at each step."""

    __slots__ = ("rows",)
    POSITION_AXES = (0,)

    def __init__(self, dim: int, *, dtype: torch.dtype, device: torch.device, limit: int, capacity: int = 0):
        assert 0 <= capacity <= limit
        super().__init__(limit)
        self.rows = torch.empty((capacity, dim), dtype=dtype, device=device)

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return (self.rows,)

    def _set_parts(self, parts: tuple[torch.Tensor, ...]) -> None:
        (self.rows,) = parts


class KVPool:
    """Every session's KV cache in one tensor made once, at start, from the configured limits: keys and values,
    each [layers, slots, kv_heads, limit, head_dim]. A session holds one slot (the lowest free one, so that the
    live sessions stay close together and a batch of decode rows reads one contiguous range of slots); its
    slot is free again once nothing refers to the session. On a CPU the memory is only committed as slots
    are written; on a GPU it is reserved whole, so the plan is checked where it matters."""

    def __init__(self, slots: int, layers: int, kv_heads: int, head_dim: int, *, limit: int, dtype: torch.dtype,
                 device: torch.device):
        assert slots >= 1 and limit >= 1
        self.slots, self.limit = slots, limit
        # keys and values are the two halves of one tensor, so a step's keys and values of a layer (adjacent in
        # its qkv output) are written by one indexed copy and a batch's slots gathered by one (decode_graphs)
        self.kv = torch.empty((2, layers, slots, kv_heads, limit, head_dim), dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._freed = threading.Condition()

    def session(self, wait: float = 5.0) -> PooledSession:
        """A free slot; the sessions admitted never outnumber the slots, but a session on its way to the locker
        keeps its slot until its snapshot is sealed, so wait a little for that before refusing."""
        with self._freed:
            if not self._freed.wait_for(lambda: bool(self._free), timeout=wait):
                raise RateLimited(f"the core's KV pool has no free slot (it holds {self.slots} sessions)",
                                  code="kv_pool_full", headers={"retry-after": "1"})
            slot = heapq.heappop(self._free)
        return PooledSession(self, slot)

    def in_use(self) -> int:
        with self._freed:
            return self.slots - len(self._free)

    def _release(self, slot: int) -> None:
        with self._freed:
            heapq.heappush(self._free, slot)
            self._freed.notify()


class PooledSession(Session):
    """A session whose KV cache is one slot of a KVPool: views of the pool, never regrown."""

    __slots__ = ("pool", "slot", "kv", "__weakref__")

    def __init__(self, pool: KVPool, slot: int):
        Positions.__init__(self, pool.limit)
        self.pool, self.slot = pool, slot
        self.kv = pool.kv[:, :, slot]  # [2, layers, kv_heads, limit, head_dim]: a step's keys and values in one write
        self.k, self.v = self.kv[0], self.kv[1]  # [layers, kv_heads, limit, head_dim]
        weakref.finalize(self, pool._release, slot)
