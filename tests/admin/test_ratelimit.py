"""Rate limits: exact sliding-window rpm/tpm in memory and on a real Redis, shared across processes, fail open/closed."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError

from admin.ratelimit import MemoryRateLimiter, RateDecision, RateLimiter, rate_limit_headers
from admin.ratelimit_redis import RedisRateLimiter
from tests.conftest import REDIS_URL
from veil.errors import ServiceUnavailable

ROOT = Path(__file__).resolve().parents[2]
Body = Callable[[RateLimiter], Awaitable[Any]]



@pytest.fixture
def kid(rdb: redis.Redis) -> Iterator[str]:
    """A key id unique to this test; its Redis keys are deleted afterwards."""
    key_id = f"test-rl-{uuid.uuid4().hex[:12]}"
    yield key_id
    for name in rdb.scan_iter(match=f"veil:rl:{{{key_id}*"):
        rdb.delete(name)


@pytest.fixture(params=["memory", "redis"])
def make(request: pytest.FixtureRequest, rdb: redis.Redis) -> Callable[..., RateLimiter]:
    def build(window_s: float = 60.0) -> RateLimiter:
        return MemoryRateLimiter(window_s) if request.param == "memory" else RedisRateLimiter(REDIS_URL, window_s=window_s)
    return build


def run(limiter: RateLimiter, body: Body) -> Any:
    """Run `body` in a fresh event loop and close the limiter in that same loop."""
    async def go() -> Any:
        try:
            return await body(limiter)
        finally:
            await limiter.aclose()
    return asyncio.run(go())


def keys_of(rdb: redis.Redis, key_id: str) -> set[str]:
    return {k.decode() for k in rdb.scan_iter(match=f"veil:rl:{{{key_id}}}*")}


def test_200_concurrent_at_rpm_50_admit_exactly_50(make: Callable[..., RateLimiter], kid: str) -> None:
    async def body(rl: RateLimiter) -> list[RateDecision]:
        return await asyncio.gather(*(rl.acquire(kid, rpm=50, tpm=None, tokens=10)
                                      for i in range(200)))
    decisions = run(make(), body)
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 50
    assert sorted(d.remaining_requests for d in admitted) == list(range(50))  # type: ignore[type-var]
    rejected = [d for d in decisions if not d.allowed]
    assert all(d.remaining_requests == 0 and 0 < d.retry_after_s <= 60 for d in rejected)
    assert all(d.limit_tokens is None and d.remaining_tokens is None for d in decisions)


_CHILD = """
import asyncio, sys
from admin.ratelimit_redis import RedisRateLimiter

async def main(url, key_id, tag):
    rl = RedisRateLimiter(url)
    # open the pool's connections first (on another key), so both bursts overlap in Redis
    await asyncio.gather(*(rl.acquire(key_id + "-warm", rpm=None, tpm=None, tokens=0)
                           for i in range(32)))
    print("ready", flush=True)
    sys.stdin.readline()  # both processes fire together
    ds = await asyncio.gather(*(rl.acquire(key_id, rpm=50, tpm=None, tokens=1)
                                for i in range(100)))
    print(sum(d.allowed for d in ds), flush=True)
    await rl.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


def test_two_processes_share_one_limit(rdb: redis.Redis, kid: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, REDIS_URL, kid, tag], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for tag in ("edge-a", "edge-b")]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        counts = [int(p.communicate(timeout=15)[0].strip()) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(counts) == 50, counts
    assert rdb.zcard(f"veil:rl:{{{kid}}}:req") == 50


def test_tokens_reserve_then_settle_to_actual_usage(make: Callable[..., RateLimiter], kid: str) -> None:
    async def body(rl: RateLimiter) -> None:
        async def acquire(tokens: int) -> RateDecision:
            return await rl.acquire(kid, rpm=None, tpm=1000, tokens=tokens)
        a = await acquire(600)
        assert (a.allowed, a.remaining_tokens, a.reset_tokens_s, a.limit_requests) == (True, 400, 0.0, None)
        b = await acquire(600)  # 600 reserved + 600 > 1000
        assert not b.allowed and b.entry == "" and b.remaining_tokens == 400
        assert 0 < b.reset_tokens_s <= b.retry_after_s <= 60
        await rl.settle(kid, entry=a.entry, actual_tokens=100)  # "a" really used 100
        b = await acquire(600)
        assert b.allowed and b.remaining_tokens == 300
        c = await acquire(400)
        assert not c.allowed and c.remaining_tokens == 300
        await rl.settle(kid, entry=b.entry, actual_tokens=50)
        await rl.settle(kid, entry="never-admitted", actual_tokens=10_000)  # a no-op
        c = await acquire(400)
        assert c.allowed and c.remaining_tokens == 1000 - 100 - 50 - 400
        assert not (await acquire(1001)).allowed  # can never fit: told to wait a whole window
    run(make(), body)


def test_every_admission_is_its_own_entry(make: Callable[..., RateLimiter], kid: str) -> None:
    """Entry ids are the limiter's own: two admissions never share one, so none replaces another
    (a client repeating one x-request-id used to get every request through), and settling one
    leaves the other's reservation whole."""
    async def body(rl: RateLimiter) -> None:
        first = await rl.acquire(kid, rpm=2, tpm=100, tokens=30)
        second = await rl.acquire(kid, rpm=2, tpm=100, tokens=30)
        assert first.allowed and second.allowed and first.entry != second.entry and len(first.entry) == 32
        assert not (await rl.acquire(kid, rpm=2, tpm=100, tokens=1)).allowed
        await rl.settle(kid, entry=first.entry, actual_tokens=0)
        d = await rl.acquire(kid, rpm=None, tpm=100, tokens=70)
        assert d.allowed and d.remaining_tokens == 0  # 0 + 30 + 70: the second kept its 30
    run(make(), body)


def test_both_limits_must_hold_and_rejection_records_nothing(make: Callable[..., RateLimiter], kid: str) -> None:
    async def body(rl: RateLimiter) -> None:
        d = await rl.acquire(kid, rpm=3, tpm=100, tokens=90)
        assert d.allowed and (d.remaining_requests, d.remaining_tokens) == (2, 10)
        for i in range(5):  # token-blocked requests must not use up request slots
            assert not (await rl.acquire(kid, rpm=3, tpm=100, tokens=20)).allowed
        d = await rl.acquire(kid, rpm=3, tpm=100, tokens=5)
        assert d.allowed and (d.remaining_requests, d.remaining_tokens) == (1, 5)
    run(make(), body)


def test_rejection_carries_retry_after_and_headers(make: Callable[..., RateLimiter], kid: str) -> None:
    async def body(rl: RateLimiter) -> tuple[RateDecision, RateDecision]:
        first = await rl.acquire(kid, rpm=2, tpm=100, tokens=10)
        await rl.acquire(kid, rpm=2, tpm=100, tokens=10)
        return first, await rl.acquire(kid, rpm=2, tpm=100, tokens=10)
    first, rejected = run(make(), body)
    assert first.allowed and first.retry_after_s == 0 and first.reset_requests_s == 0
    assert "retry-after" not in rate_limit_headers(first)
    assert rate_limit_headers(first)["x-ratelimit-remaining-requests"] == "1"
    assert not rejected.allowed and 59 < rejected.reset_requests_s <= 60 and rejected.retry_after_s >= 59
    h = rate_limit_headers(rejected)
    assert set(h) == {"retry-after", *(f"x-ratelimit-{w}-{k}" for w in ("limit", "remaining", "reset")
                                       for k in ("requests", "tokens"))}
    assert (h["retry-after"], h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("60", "2", "0")
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-tokens"]) == \
        ("100", "80", "0s")
    assert re.fullmatch(r"(59|60)(\.\d{1,3})?s", h["x-ratelimit-reset-requests"])


def test_headers_only_for_limits_that_are_set() -> None:
    unlimited = RateDecision(True, None, None, 0.0, None, None, 0.0, 0.0)
    assert rate_limit_headers(unlimited) == {}
    tokens_only = RateDecision(False, None, None, 0.0, 500, 0, 1.5, 0.2)
    assert rate_limit_headers(tokens_only) == {"x-ratelimit-limit-tokens": "500", "x-ratelimit-remaining-tokens": "0",
                                               "x-ratelimit-reset-tokens": "1.5s", "retry-after": "1"}


def test_the_window_slides(make: Callable[..., RateLimiter], kid: str, rdb: redis.Redis) -> None:
    async def body(rl: RateLimiter) -> None:
        async def ok(name: str) -> RateDecision:
            return await rl.acquire(kid, rpm=3, tpm=None, tokens=1)
        t0 = time.monotonic()
        assert (await ok("a")).allowed and (await ok("b")).allowed
        await asyncio.sleep(0.5)
        assert (await ok("c")).allowed
        d = await ok("d")
        assert not d.allowed and 0.3 < d.retry_after_s <= 0.5  # until "a" leaves the window
        await asyncio.sleep(1.05 - (time.monotonic() - t0))
        # "a" and "b" have left, "c" has not: a fixed window would reset to 3 here, a sliding one allows 2
        assert (await ok("e")).allowed and (await ok("f")).allowed
        g = await ok("g")
        assert not g.allowed and 0.2 < g.retry_after_s <= 0.5
    limiter = make(window_s=1.0)
    run(limiter, body)
    if isinstance(limiter, RedisRateLimiter):
        time.sleep(1.1)
        assert keys_of(rdb, kid) == set()  # idle keys expire after one window


def test_redis_key_names_hold_only_the_key_id(rdb: redis.Redis, kid: str) -> None:
    async def body(rl: RateLimiter) -> str:
        return (await rl.acquire(kid, rpm=5, tpm=100, tokens=7)).entry
    entry = run(RedisRateLimiter(REDIS_URL), body)
    names = keys_of(rdb, kid)
    assert names == {f"veil:rl:{{{kid}}}:{part}" for part in ("req", "tok", "sum")}
    assert entry and not any(entry in k.decode() for k in rdb.scan_iter(match="veil:rl:*"))
    assert all(0 < rdb.pttl(n) <= 60_001 for n in names)


def test_unreachable_redis_fails_closed_quickly() -> None:
    async def body(rl: RateLimiter) -> None:
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailable) as info:
            await rl.acquire("k", rpm=5, tpm=None, tokens=1)
        assert time.monotonic() - t0 < 2
        assert (info.value.status_code, info.value.code) == (503, "rate_limiter_unavailable")
        assert isinstance(info.value.__cause__, RedisError)
        await rl.settle("k", entry="r", actual_tokens=1)  # logs, never raises
    run(RedisRateLimiter("redis://127.0.0.1:1", timeout_s=0.3), body)


def test_a_silent_redis_times_out_and_fails_closed() -> None:
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        async def body(rl: RateLimiter) -> None:
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await rl.acquire("k", rpm=5, tpm=None, tokens=1)
            assert time.monotonic() - t0 < 2
        run(RedisRateLimiter(f"redis://127.0.0.1:{port}", timeout_s=0.2), body)


def test_redis_errors_other_than_connection_are_translated(rdb: redis.Redis, kid: str) -> None:
    rdb.set(f"veil:rl:{{{kid}}}:req", "not a sorted set")  # WRONGTYPE from inside the script
    async def body(rl: RateLimiter) -> None:
        with pytest.raises(ServiceUnavailable):
            await rl.acquire(kid, rpm=5, tpm=None, tokens=1)
    run(RedisRateLimiter(REDIS_URL), body)


def test_unreachable_redis_fails_open_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def body(rl: RateLimiter) -> RateDecision:
        return await rl.acquire("key_abc", rpm=5, tpm=100, tokens=1)
    with caplog.at_level(logging.WARNING, logger="veil.admin.ratelimit"):
        d = run(RedisRateLimiter("redis://:hunter2-secret@127.0.0.1:1", fail_open=True, timeout_s=0.3), body)
    assert d.allowed and d.remaining_requests is None and d.remaining_tokens is None
    assert rate_limit_headers(d) == {"x-ratelimit-limit-requests": "5", "x-ratelimit-limit-tokens": "100"}
    [record] = [r for r in caplog.records if r.name == "veil.admin.ratelimit"]
    assert record.levelno == logging.WARNING and "Redis is unreachable" in record.getMessage()
    assert "failing open" in record.getMessage() and "hunter2" not in caplog.text


def test_memory_limiter_forgets_idle_keys() -> None:
    now = [0.0]
    rl = MemoryRateLimiter(60.0, clock=lambda: now[0])
    async def body(rl: RateLimiter) -> None:
        await rl.acquire("idle", rpm=1, tpm=None, tokens=1)
        now[0] = 61.0
        await rl.acquire("busy", rpm=1, tpm=None, tokens=1)
    run(rl, body)
    assert set(rl._logs) == {"busy"}


def test_reserve_adds_tokens_to_a_counted_request(make: Callable[..., RateLimiter], kid: str) -> None:
    """The edge counts a request before reading its body (0 tokens), then reserves its worst case: a refused
    reservation keeps the request counted, so over-limit prompts still use up rpm."""
    async def body(rl: RateLimiter) -> None:
        a = await rl.acquire(kid, rpm=3, tpm=100, tokens=0)
        assert a.allowed and (a.remaining_requests, a.remaining_tokens) == (2, 100)
        r = await rl.reserve(kid, entry=a.entry, rpm=3, tpm=100, tokens=60)
        assert r.allowed and r.entry == a.entry and (r.remaining_requests, r.remaining_tokens) == (2, 40)
        b = await rl.acquire(kid, rpm=3, tpm=100, tokens=0)
        refused = await rl.reserve(kid, entry=b.entry, rpm=3, tpm=100, tokens=50)
        assert not refused.allowed and refused.retry_after_s > 0 and refused.remaining_tokens == 40
        assert (await rl.reserve(kid, entry=b.entry, rpm=3, tpm=100, tokens=40)).allowed  # it still fits smaller
        await rl.settle(kid, entry=a.entry, actual_tokens=10)  # a used 10 of its 60
        c = await rl.acquire(kid, rpm=3, tpm=100, tokens=0)
        assert c.allowed and c.remaining_requests == 0 and c.remaining_tokens == 50
        assert not (await rl.acquire(kid, rpm=3, tpm=100, tokens=0)).allowed  # the refused one counted
        # lowering a reservation always fits
        assert (await rl.reserve(kid, entry=b.entry, rpm=3, tpm=100, tokens=5)).remaining_tokens == 85
    run(make(), body)


def test_reserve_of_an_entry_gone_from_the_window_admits_it_afresh(make: Callable[..., RateLimiter],
                                                                   kid: str) -> None:
    async def body(rl: RateLimiter) -> None:
        a = await rl.acquire(kid, rpm=1, tpm=100, tokens=0)
        await asyncio.sleep(0.3)
        r = await rl.reserve(kid, entry=a.entry, rpm=1, tpm=100, tokens=30)
        assert r.allowed and r.remaining_requests == 0 and r.remaining_tokens == 70
        assert not (await rl.reserve(kid, entry="never-admitted", rpm=1, tpm=100, tokens=1)).allowed
    run(make(0.2), body)
