"""Per-key rate limits (requests and tokens per minute) over an exact sliding window, plus OpenAI-style headers.

Each key keeps a log of admitted requests (entry id → time, reserved tokens). The limiter makes every entry id
itself, 128 random bits returned in the decision: a client's `x-request-id` is never an entry, so no caller can
replace or settle another request's reservation by naming it. A request is admitted only if
the log's request count and token sum, after trimming entries older than the window, leave room for it; a
rejected request records nothing. The edge admits a request with 0 tokens before it reads the body, so every
request counts toward rpm, refused or not; `reserve` then raises the entry to the prompt's worst case (tpm
checked), and `settle` corrects it to the tokens actually used. The Redis
limiter (`admin.ratelimit_redis`) runs the same algorithm in one Lua script so edge replicas share one limit.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from admin.ratelimit_redis import RedisRateLimiter


@dataclasses.dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one `acquire`: whether it was admitted and what the client may be told."""

    allowed: bool
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float  # seconds until a request slot frees (0 if not limited / slots free)
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float  # seconds until a token frees (when rejected: until this request's tokens fit)
    retry_after_s: float  # when rejected: seconds until this request could be admitted; 0 when allowed
    entry: str = ""  # when allowed: the reservation's id, for `settle`


@runtime_checkable
class RateLimiter(Protocol):
    """What the edge calls: `acquire` counts the request before its body is read, `reserve` adds its worst-case
    tokens once the prompt is tokenized, `settle` corrects them to what it used."""

    async def acquire(self, key_id: str, *, rpm: int | None, tpm: int | None, tokens: int) -> RateDecision: ...

    async def reserve(self, key_id: str, *, entry: str, rpm: int | None, tpm: int | None,
                      tokens: int) -> RateDecision: ...

    async def settle(self, key_id: str, *, entry: str, actual_tokens: int) -> None: ...

    async def aclose(self) -> None: ...


class MemoryRateLimiter:
    """The embedded limiter for a single edge: the sliding-window log in process memory."""

    def __init__(self, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic):
        assert window_s > 0
        self.window_s = window_s
        self._clock = clock
        # key id → entry id → [time, tokens]; insertion order is time order (one clock, under the lock)
        self._logs: dict[str, collections.OrderedDict[str, list[Any]]] = {}
        self._used: dict[str, int] = {}
        # a plain lock: the critical sections never await, and it is not tied to one event loop
        self._lock = threading.Lock()
        self._last_sweep = clock()

    async def acquire(self, key_id: str, *, rpm: int | None, tpm: int | None, tokens: int) -> RateDecision:
        """Admit the request and reserve `tokens` under a new entry id, or reject it and record nothing."""
        return self._admit(key_id, rpm, tpm, max(0, tokens), new_entry_id(), grow=False)

    async def reserve(self, key_id: str, *, entry: str, rpm: int | None, tpm: int | None,
                      tokens: int) -> RateDecision:
        """Raise the admitted `entry`'s reservation to `tokens` if the key's tpm leaves room for it. Refused,
        the entry keeps what it holds and still counts as a request; an entry that has left the window is
        admitted afresh (it no longer counts)."""
        return self._admit(key_id, rpm, tpm, max(0, tokens), entry, grow=True)

    def _admit(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int, entry: str, *,
               grow: bool) -> RateDecision:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            log = self._logs.setdefault(key_id, collections.OrderedDict())
            self._trim(key_id, log, now)
            count, used = len(log), self._used.get(key_id, 0)
            held = log.get(entry) if grow else None
            if held is not None:  # already counted as a request: only its tokens change
                allowed = tpm is None or used - held[1] + tokens <= tpm
                if allowed:
                    used += tokens - held[1]
                    held[1] = tokens
                    self._used[key_id] = used
                need = tokens - held[1]
            else:
                allowed = (rpm is None or count + 1 <= rpm) and (tpm is None or used + tokens <= tpm)
                if allowed:
                    log[entry] = [now, tokens]
                    count, used = count + 1, used + tokens
                    self._used[key_id] = used
                elif not log:
                    del self._logs[key_id]
                need = tokens
            # the "excess" is how much must expire before the next unit (allowed) or this request (rejected) fits
            ex_req = count + 1 - rpm if rpm is not None else 0
            ex_tok = (used + (1 if allowed else need) - tpm) if tpm is not None else 0
            reset_req = self._free_in(log, now, ex_req, by_tokens=False)
            reset_tok = self._free_in(log, now, ex_tok, by_tokens=True)
        return _decision(allowed, rpm, tpm, count, used, reset_req, reset_tok,
                         entry if allowed or held is not None else "")

    async def settle(self, key_id: str, *, entry: str, actual_tokens: int) -> None:
        """Correct a reservation to the tokens actually used (a no-op once it has left the window)."""
        with self._lock:
            log = self._logs.get(key_id)
            held = log.get(entry) if log is not None else None
            if held is not None:
                actual = max(0, actual_tokens)
                self._used[key_id] += actual - held[1]
                held[1] = actual

    async def aclose(self) -> None:
        """Nothing to release."""

    def _trim(self, key_id: str, log: collections.OrderedDict[str, list[Any]], now: float) -> None:
        cutoff = now - self.window_s
        while log:
            entry, (t, n) = next(iter(log.items()))
            if t > cutoff:
                break
            del log[entry]
            self._used[key_id] -= n
        if not log:
            self._used.pop(key_id, None)

    def _free_in(self, log: collections.OrderedDict[str, list[Any]], now: float, excess: int, *,
                 by_tokens: bool) -> float:
        """Seconds until the oldest entries free `excess` requests (or tokens); the window if they never can."""
        if excess <= 0:
            return 0.0
        freed = 0
        for t, n in log.values():
            freed += n if by_tokens else 1
            if freed >= excess:
                return t + self.window_s - now
        return self.window_s

    def _sweep(self, now: float) -> None:
        # once a window, forget idle keys so memory follows active keys only (like the Redis TTL)
        if now - self._last_sweep < self.window_s:
            return
        self._last_sweep = now
        for key_id in list(self._logs):
            self._trim(key_id, self._logs[key_id], now)
            if not self._logs[key_id]:
                del self._logs[key_id]


def new_entry_id() -> str:
    """A reservation's id: made here, never taken from a request."""
    return secrets.token_hex(16)


def _decision(allowed: bool, rpm: int | None, tpm: int | None, count: int, used: int,
              reset_req: float, reset_tok: float, entry: str = "") -> RateDecision:
    """Build a decision from the log's count and token sum (after admission when allowed)."""
    return RateDecision(
        allowed=allowed,
        limit_requests=rpm,
        remaining_requests=None if rpm is None else max(0, rpm - count),
        reset_requests_s=max(0.0, reset_req),
        limit_tokens=tpm,
        remaining_tokens=None if tpm is None else max(0, tpm - used),
        reset_tokens_s=max(0.0, reset_tok),
        retry_after_s=0.0 if allowed else max(reset_req, reset_tok, 0.001),
        entry=entry,
    )


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1.5s', '0s'."""
    text = f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


def rate_limit_headers(d: RateDecision) -> dict[str, str]:
    """The x-ratelimit-* headers for the limits that are set, plus retry-after when rejected."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset in (("requests", d.limit_requests, d.remaining_requests, d.reset_requests_s),
                                          ("tokens", d.limit_tokens, d.remaining_tokens, d.reset_tokens_s)):
        if limit is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        if remaining is not None:  # unknown when Redis was down and the limiter failed open
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    if not d.allowed:
        headers["retry-after"] = str(max(1, math.ceil(d.retry_after_s)))
    return headers


def __getattr__(name: str) -> Any:
    # imported lazily so the embedded limiter works without the redis package installed
    if name == "RedisRateLimiter":
        from admin.ratelimit_redis import RedisRateLimiter
        return RedisRateLimiter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MemoryRateLimiter", "RateDecision", "RateLimiter", "RedisRateLimiter", "rate_limit_headers"]
