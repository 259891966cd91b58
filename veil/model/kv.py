"""One sequence's KV cache and the one rule for writing into it.

A step writes `n` new positions at `offset`: `Session.begin` checks the offset against what
the cache holds, rolls back anything after it (a re-prefill, rejected speculation) and makes
room; `DecoderStack.step` runs the blocks and commits the new length. The core's sessions,
the edge-held blocks and the privacy audit all go through these two calls.
"""

from __future__ import annotations

import dataclasses

import torch

from veil.errors import Conflict, PayloadTooLarge

MIN_CAPACITY = 256  # positions allocated at first use; growth doubles from here up to the limit


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """One session's share of a batched step: n new positions starting at offset."""

    session: Session
    offset: int
    n: int

    @property
    def end(self) -> int:
        return self.offset + self.n


class Session:
    """k, v are [layers, kv_heads, capacity, head_dim]; positions below `length` are valid."""

    __slots__ = ("length", "limit", "k", "v")

    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device,
                 limit: int, capacity: int = 0):
        assert 0 <= capacity <= limit
        self.length = 0
        self.limit = limit  # positions this session may ever hold
        self.k = torch.empty((layers, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def begin(self, offset: int, n: int) -> Segment:
        """Check a step of n positions at offset, roll back past offset, make room (409 / 413 if it cannot)."""
        assert n > 0
        if offset > self.length:
            raise Conflict(f"step offset {offset} is past the session length {self.length}")
        if offset + n > self.limit:
            raise PayloadTooLarge(f"the session would hold {offset + n} tokens; its limit is {self.limit}",
                                  code="session_token_limit")
        self.length = offset
        self._reserve(offset + n)
        return Segment(self, offset, n)

    def commit(self, segment: Segment) -> None:
        """Called by the stack once the segment's keys and values are written."""
        assert segment.session is self and segment.offset <= self.length
        self.length = segment.end

    def fork(self) -> Session:
        """A copy holding the same valid positions (for beams that share a prefix)."""
        layers, kv_heads, capacity, head_dim = self.k.shape
        twin = Session(layers, kv_heads, head_dim, dtype=self.k.dtype, device=self.k.device, limit=self.limit)
        twin.k, twin.v = self._copies(capacity)
        twin.length = self.length
        return twin

    def _reserve(self, tokens: int) -> None:
        """Grow by doubling (at least MIN_CAPACITY, at most the limit) so that `tokens` positions fit."""
        if tokens <= self.capacity:
            return
        self.k, self.v = self._copies(min(max(MIN_CAPACITY, self.capacity * 2, tokens), self.limit))

    def _copies(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New k, v of `capacity` positions holding this session's valid ones."""
        layers, kv_heads, _, head_dim = self.k.shape
        k = torch.empty((layers, kv_heads, capacity, head_dim), dtype=self.k.dtype, device=self.k.device)
        v = torch.empty_like(k)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        return k, v
