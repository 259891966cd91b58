"""The sliding-window limiter on Redis: one Lua script per acquire, on the server's clock, so replicas share a limit.

Per key id, under one hash tag: `veil:rl:{<key_id>}:req` (ZSET entry id → admission time in µs),
`veil:rl:{<key_id>}:tok` (HASH entry id → reserved tokens) and `veil:rl:{<key_id>}:sum` (their running sum).
All three expire one window after the last admission, so idle keys vanish. Entry ids are made by the limiter
(`new_entry_id`), never taken from a request.
"""

from __future__ import annotations

import logging
import math
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from admin.ratelimit import RateDecision, _decision, new_entry_id
from veil.errors import ServiceUnavailable

log = logging.getLogger("veil.admin.ratelimit")

# KEYS: req zset, tok hash, sum. ARGV: rpm (-1 = none), tpm (-1 = none), tokens, entry id, window µs, grow (0/1).
# grow = 1 raises an entry already in the window to `tokens` (tpm checked; it is already counted as a request).
# Returns {allowed, count, used, µs until a request frees, µs until tokens free, held}; counts are after admission;
# held = 1 when the entry is (still) in the window.
_ACQUIRE = """
local z, h, s = KEYS[1], KEYS[2], KEYS[3]
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local entry, window, grow = ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local used = redis.call('GET', s)
if used then
  used = tonumber(used)
else
  used = 0
  for _, v in ipairs(redis.call('HVALS', h)) do used = used + tonumber(v) end
end
local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - window)
for i = 1, #old do
  used = used - (tonumber(redis.call('HGET', h, old[i])) or 0)
  redis.call('HDEL', h, old[i])
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now - window) end
local count = redis.call('ZCARD', z)
local ttl = math.ceil(window / 1000) + 1
local prev = nil
if grow then prev = redis.call('HGET', h, entry) end
local allowed, need
if prev then
  prev = tonumber(prev)
  need = tokens - prev
  allowed = tpm < 0 or used + need <= tpm
  if allowed then
    redis.call('HSET', h, entry, tokens)
    used = used + need
    redis.call('SET', s, used, 'PX', ttl)
  elseif #old > 0 then
    redis.call('SET', s, used, 'KEEPTTL')
  end
else
  need = tokens
  allowed = (rpm < 0 or count + 1 <= rpm) and (tpm < 0 or used + tokens <= tpm)
  if allowed then
    redis.call('ZADD', z, now, entry)
    redis.call('HSET', h, entry, tokens)
    count, used = count + 1, used + tokens
    redis.call('SET', s, used, 'PX', ttl)
    redis.call('PEXPIRE', z, ttl)
    redis.call('PEXPIRE', h, ttl)
  elseif count == 0 then
    redis.call('DEL', s, h)
  elseif #old > 0 then
    redis.call('SET', s, used, 'KEEPTTL')
  end
end
local function free_in(excess, by_tokens)
  if excess <= 0 then return 0 end
  if not by_tokens then
    local e = redis.call('ZRANGE', z, excess - 1, excess - 1, 'WITHSCORES')
    if #e == 0 then return window end
    return tonumber(e[2]) + window - now
  end
  local freed, start = 0, 0
  while true do
    local e = redis.call('ZRANGE', z, start, start + 99, 'WITHSCORES')
    if #e == 0 then return window end
    for i = 1, #e, 2 do
      freed = freed + (tonumber(redis.call('HGET', h, e[i])) or 0)
      if freed >= excess then return tonumber(e[i + 1]) + window - now end
    end
    start = start + 100
  end
end
local ex_req, ex_tok = 0, 0
if rpm >= 0 then ex_req = count + 1 - rpm end
if tpm >= 0 then ex_tok = used + (allowed and 1 or need) - tpm end
return {allowed and 1 or 0, count, used, free_in(ex_req, false), free_in(ex_tok, true), (allowed or prev) and 1 or 0}
"""

# KEYS: tok hash, sum. ARGV: entry id, actual tokens. A no-op once the entry has left the window.
_SETTLE = """
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if not prev then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
-- a missing sum is rebuilt from the hash by the next acquire; INCRBY would create it without a TTL
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]) - tonumber(prev)) end
return 1
"""

_POOL_WAIT_S = 5.0  # how long a burst may queue for a pooled connection before it counts as unavailable
_WARN_EVERY_S = 10.0  # an outage warns once, then at most this often, not once per request


def _keys(key_id: str) -> list[str]:
    """The key id is the only caller value in a key name; the braces keep a key's three keys in one cluster slot."""
    return [f"veil:rl:{{{key_id}}}:{part}" for part in ("req", "tok", "sum")]


class RedisRateLimiter:
    """The shared limiter: several edge processes on one Redis enforce one combined limit exactly."""

    def __init__(self, url: str, *, fail_open: bool = False, window_s: float = 60.0, timeout_s: float = 1.0,
                 max_connections: int = 32):
        assert window_s > 0
        self.window_s = window_s
        self.fail_open = fail_open
        # short timeouts and one immediate retry: a stale pooled connection is retried, a dead Redis fails fast;
        # a bounded pool that queues callers, so a burst waits for a connection instead of failing
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=_POOL_WAIT_S, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
        self._redis = aioredis.Redis.from_pool(pool)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._settle = self._redis.register_script(_SETTLE)
        self._warned_at = -math.inf

    async def acquire(self, key_id: str, *, rpm: int | None, tpm: int | None, tokens: int) -> RateDecision:
        """Admit the request and reserve `tokens` under a new entry id, or reject it and record nothing; one
        round trip."""
        return await self._run(key_id, rpm, tpm, tokens, new_entry_id(), grow=False)

    async def reserve(self, key_id: str, *, entry: str, rpm: int | None, tpm: int | None,
                      tokens: int) -> RateDecision:
        """Raise the admitted `entry` to `tokens` if tpm leaves room (see MemoryRateLimiter.reserve)."""
        return await self._run(key_id, rpm, tpm, tokens, entry, grow=True)

    async def _run(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int, entry: str, *,
                   grow: bool) -> RateDecision:
        args: list[int | str] = [-1 if rpm is None else max(0, rpm), -1 if tpm is None else max(0, tpm), max(0, tokens),
                entry, round(self.window_s * 1_000_000), 1 if grow else 0]
        try:
            allowed, count, used, req_us, tok_us, held = await self._acquire(keys=_keys(key_id), args=args)
        except (RedisError, OSError) as exc:
            self._warn(exc, key_id)
            if self.fail_open:
                return RateDecision(True, rpm, None, 0.0, tpm, None, 0.0, 0.0, entry)
            raise ServiceUnavailable("rate limiter unavailable: Redis is unreachable",
                                     code="rate_limiter_unavailable") from exc
        return _decision(bool(allowed), rpm, tpm, int(count), int(used), int(req_us) / 1e6, int(tok_us) / 1e6,
                         entry if held else "")

    async def settle(self, key_id: str, *, entry: str, actual_tokens: int) -> None:
        """Correct a reservation to the tokens actually used; on a Redis failure, log and keep the reservation."""
        try:
            await self._settle(keys=_keys(key_id)[1:], args=[entry, max(0, actual_tokens)])
        except (RedisError, OSError) as exc:
            self._warn(exc, key_id)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    def _warn(self, exc: BaseException, key_id: str) -> None:
        # the exception's class only: redis messages may echo the URL, which can carry a password
        now = time.monotonic()
        if now - self._warned_at < _WARN_EVERY_S:
            return
        self._warned_at = now
        action = "failing open: requests are admitted unlimited" if self.fail_open else "failing closed: 503"
        log.warning("rate limiter: Redis is unreachable (%s); %s (key id %s)", type(exc).__name__, action, key_id)
