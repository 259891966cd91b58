"""Who gets this edge's core sessions: a per-key cap on concurrent generations, and a fair share when full.

Every generation holds one core session from prefill to its last token, and the core grants an edge
only so many (`edge.max_sessions`, this edge's quota there). Without arbitration one key with many long
requests takes them all and every other key is refused. The rules, checked when a request arrives and
again whenever a session frees:

- a key never holds more than its own cap (`max_concurrent` of the key, else `edge.max_concurrent_per_key`);
  a request over it is refused at once with 429, since only the caller's own requests stand in its way;
- while another key waits for a session, no key takes more than `key_session_share` of them; otherwise
  a key may use every free session (nothing is kept idle);
- when no session is free, a request waits (at most `admission_wait_seconds`, then 503 with Retry-After),
  and a freed session goes to the waiting key that holds the fewest (max-min fairness), first come first
  served among equals.

The arbitration is per edge replica: each replica divides its own quota.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math

from veil.errors import RateLimited, ServiceUnavailable


@dataclasses.dataclass(eq=False, slots=True)
class _Waiter:
    key_id: str
    cap: int | None
    seq: int
    granted: asyncio.Future[None]


class SessionShare:
    def __init__(self, capacity: int, *, per_key: int | None = None, share: float = 0.5, wait_s: float = 30.0):
        assert capacity >= 1 and 0 < share <= 1 and wait_s >= 0
        self.capacity, self.per_key, self.wait_s = capacity, per_key, wait_s
        self.share_cap = max(1, math.ceil(capacity * share))
        self.active: collections.Counter[str] = collections.Counter()
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def total(self) -> int:
        return sum(self.active.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def take(self, key_id: str, cap: int | None = None) -> None:
        """Hold one session for `key_id` (whose own cap is `cap`, else the deployment's); pair with `give`."""
        cap = cap if cap is not None else self.per_key
        if cap is not None and self.active[key_id] >= cap:
            raise RateLimited(f"too many concurrent requests on key {key_id}: at most {cap} at a time",
                              code="concurrency_limit_exceeded", headers={"retry-after": "1"})
        waiter = _Waiter(key_id, cap, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._dispatch()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), timeout=self.wait_s)
        except TimeoutError:
            if self._withdraw(waiter):
                raise ServiceUnavailable("every core session of this edge is in use; retry shortly",
                                         code="server_busy", headers={"retry-after": "1"}) from None
        except BaseException:  # the client went away while waiting
            if not self._withdraw(waiter):
                self.give(key_id)  # granted as it left: hand it on
            raise

    def give(self, key_id: str) -> None:
        """Release a session `take` granted, and pass it to the fairest waiter."""
        self.active[key_id] -= 1
        if self.active[key_id] <= 0:
            del self.active[key_id]
        self._dispatch()

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Take a waiter out of the queue; False if it was granted first (it then holds a session)."""
        if waiter.granted.done():
            return False
        self._waiting.remove(waiter)
        waiter.granted.cancel()
        self._dispatch()  # the one that left may have been what held others back
        return True

    def _contended(self, key_id: str) -> bool:
        # only another key *waiting* holds a key to its share: sessions free for the taking are never kept idle
        return any(w.key_id != key_id for w in self._waiting)

    def _eligible(self, w: _Waiter) -> bool:
        held = self.active[w.key_id]
        return (self.total < self.capacity and (w.cap is None or held < w.cap)
                and (held < self.share_cap or not self._contended(w.key_id)))

    def _dispatch(self) -> None:
        while True:
            ready = [w for w in self._waiting if self._eligible(w)]
            if not ready:
                return
            best = min(ready, key=lambda w: (self.active[w.key_id], w.seq))
            self._waiting.remove(best)
            self.active[best.key_id] += 1
            best.granted.set_result(None)
