"""The core's sessions by id: who owns each, its channel, its KV cache, and the limits on all of them.

A session is opened by a handshake (`open`), which binds it to an enrolled edge and its sealed
channel; its KV cache is made at its first step or restored from the locker. Limits: sessions per
edge (its quota), sessions in all (`max_sessions`), tokens per session, idle time. An idle session
goes to the locker (`spill`) when one is configured, else it expires.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Set

from veil.channel import Channel
from veil.errors import Conflict, NotFound, PayloadTooLarge, RateLimited
from veil.model.kv import Positions, Segment


@dataclasses.dataclass(slots=True, eq=False)
class Held:
    owner: str  # the enrolled edge's name
    channel: Channel | None
    last_used: float
    kv: Positions | None = None  # made at the first step, or restored from the locker
    locker_key: bytes | None = None  # given by the edge inside the channel; lives only here
    busy: int = 0  # steps in flight: a busy session is never spilled


Spill = Callable[[str, Held], None]  # hands an idle session's KV to the locker


class SessionTable:
    """Thread-safe: the HTTP loop opens, closes and marks steps, the runner admits and sweeps."""

    def __init__(self, new_session: Callable[[int], Positions], *, max_sessions: int, max_tokens: int,
                 idle_seconds: float, clock: Callable[[], float] = time.monotonic,
                 spill: Spill | None = None, spill_after: float = 30.0):
        self.new_session = new_session  # limit -> an empty KV cache (DecoderStack.new_session)
        self.max_sessions, self.max_tokens, self.idle_seconds = max_sessions, max_tokens, idle_seconds
        self.clock, self.spill, self.spill_after = clock, spill, spill_after
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def holding_kv(self) -> int:
        return self.live(frozenset())

    def live(self, stepping: Set[str]) -> int:
        """Sessions holding a KV cache, and those in `stepping` (with a step waiting) that hold none yet."""
        with self._lock:
            return sum(1 for sid, h in self._held.items() if h.kv is not None or sid in stepping)

    def open(self, sid: str, owner: str, quota: int, channel: Channel | None, resume: bool = False) -> Held:
        """Bind `sid` to `owner` with a new channel: a new session, or (resume) a new channel for its own."""
        now = self.clock()
        with self._lock:
            held = self._held.get(sid)
            if held is not None:
                if held.owner != owner or not resume:
                    raise Conflict("a session with this id is already open", code="session_exists")
                held.channel, held.last_used = channel, now
                return held
            if sum(1 for h in self._held.values() if h.owner == owner) >= quota:
                self._make_room_locked(now, owner)
            if sum(1 for h in self._held.values() if h.owner == owner) >= quota:
                raise RateLimited(f"this edge holds its quota of {quota} sessions on the core",
                                  code="edge_session_quota", headers={"retry-after": "1"})
            if len(self._held) >= self.max_sessions:
                self._make_room_locked(now, None)
            if len(self._held) >= self.max_sessions:
                raise RateLimited(f"the core holds its limit of max_sessions={self.max_sessions} sessions",
                                  code="session_limit", headers={"retry-after": "1"})
            held = self._held[sid] = Held(owner, channel, now)
            return held

    def get(self, sid: str) -> Held | None:
        with self._lock:
            return self._held.get(sid)

    def use(self, held: Held, delta: int) -> None:
        """Mark a step of `held` in flight (+1) or done (-1)."""
        with self._lock:
            held.busy += delta
            held.last_used = self.clock()

    def admit(self, sid: str, offset: int, new_tokens: int) -> Segment:
        """The segment a step at `offset` with `new_tokens` writes; the KV cache is made at offset 0."""
        end = offset + new_tokens
        if end > self.max_tokens:
            raise PayloadTooLarge(
                f"session would hold {end} tokens; the core's limit max_tokens_per_session is {self.max_tokens}",
                code="session_token_limit",
            )
        with self._lock:
            held = self._held.get(sid)
            if held is None or (held.kv is None and offset != 0):
                raise NotFound("the core does not hold this session's cache: it expired, was closed or its "
                               "replica went away; start again at offset 0", code="session_not_found")
            if held.kv is None:
                held.kv = self.new_session(self.max_tokens)
            held.last_used = self.clock()
            kv = held.kv
        return kv.begin(offset, new_tokens)

    def rewind(self, sid: str, offset: int) -> None:
        """Forget the positions from `offset` on: a step that ran in chunks and stopped part-way commits nothing."""
        with self._lock:
            held = self._held.get(sid)
            if held is not None and held.kv is not None:
                held.kv.length = min(held.kv.length, offset)

    def close(self, sid: str) -> Held | None:
        with self._lock:
            return self._held.pop(sid, None)

    def drain(self) -> list[tuple[str, Held]]:
        """Every session, removed (at shutdown: the caller spills them)."""
        with self._lock:
            out = list(self._held.items())
            self._held.clear()
        return out

    def expire_idle(self) -> int:
        with self._lock:
            return self._expire_locked(self.clock())

    def _spillable(self, held: Held) -> bool:
        return self.spill is not None and held.busy == 0 and held.kv is not None and held.locker_key is not None

    def _expire_locked(self, now: float) -> int:
        gone = 0
        for sid, held in list(self._held.items()):
            idle = now - held.last_used
            if held.busy == 0 and (idle > self.idle_seconds or (idle > self.spill_after and self._spillable(held))):
                self._evict_locked(sid)
                gone += 1
        return gone

    def _evict_locked(self, sid: str) -> None:
        held = self._held.pop(sid)
        if self._spillable(held):
            assert self.spill is not None
            self.spill(sid, held)

    def _make_room_locked(self, now: float, owner: str | None) -> None:
        """Expire idle sessions; if still full, send the least recently used idle one (of `owner`) to the locker."""
        if self._expire_locked(now):
            return
        candidates = [(h.last_used, sid) for sid, h in self._held.items()
                      if (owner is None or h.owner == owner) and self._spillable(h) and h.last_used < now]
        if candidates:
            self._evict_locked(min(candidates)[1])
