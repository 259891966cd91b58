"""Both session stores: a session lives until it idles out or reaches its absolute limit, ends at once when asked,
and a store keeps only the SHA-256 of a session id."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from admin.console.sessions import (
    REDIS_PREFIX,
    ConsoleSessions,
    MemoryConsoleSessions,
    RedisConsoleSessions,
    new_session,
)
from tests.conftest import REDIS_URL
from veil.errors import ServiceUnavailable


@pytest.fixture(params=["memory", "redis"])
def make_store(request, rdb):
    """Stores of one kind; each test closes what it made inside its own event loop."""
    def make(idle_s: float = 60, absolute_s: float = 600) -> ConsoleSessions:
        if request.param == "memory":
            return MemoryConsoleSessions(idle_s, absolute_s)
        return RedisConsoleSessions(REDIS_URL, idle_s, absolute_s)
    return make


def test_put_get_end(make_store) -> None:
    async def run() -> None:
        store = make_store()
        sid, session = new_session("k1", "api_key", "f" * 32)
        await store.put(sid, session)
        got = await store.get(sid)
        assert got is not None and (got.key_id, got.csrf, got.fingerprint) == ("k1", session.csrf, "f" * 32)
        assert await store.get(sid + "x") is None and await store.get("") is None
        await store.end(sid)
        assert await store.get(sid) is None
        await store.aclose()
    asyncio.run(run())


def test_idle_and_absolute_timeouts(make_store) -> None:
    async def run() -> None:
        idle = make_store(idle_s=0.3, absolute_s=60)
        sid, session = new_session("k1", "api_key", "f")
        await idle.put(sid, session)
        for _ in range(3):  # each use restarts the idle clock
            time.sleep(0.15)
            assert await idle.get(sid) is not None
        time.sleep(0.4)
        assert await idle.get(sid) is None
        absolute = make_store(idle_s=60, absolute_s=0.4)
        sid, session = new_session("k1", "api_key", "f")
        await absolute.put(sid, session)
        time.sleep(0.2)
        assert await absolute.get(sid) is not None
        time.sleep(0.25)
        assert await absolute.get(sid) is None
        await idle.aclose()
        await absolute.aclose()
    asyncio.run(run())


def test_redis_holds_the_hash_of_the_id_with_a_ttl_and_never_revives_an_ended_session(rdb) -> None:
    async def run() -> None:
        store = RedisConsoleSessions(REDIS_URL)
        sid, session = new_session("k1", "api_key", "f")
        await store.put(sid, session)
        key = REDIS_PREFIX + hashlib.sha256(sid.encode()).hexdigest()
        raw = rdb.get(key)
        assert raw is not None and sid.encode() not in raw
        assert 29 * 60 * 1000 < rdb.pttl(key) <= 30 * 60 * 1000
        assert not [k for k in rdb.scan_iter(match=REDIS_PREFIX + "*") if sid.encode() in k]
        rdb.set(key, b"not json")
        assert await store.get(sid) is None  # a foreign value counts as no session
        rdb.delete(key)
        assert await store.get(sid) is None and rdb.get(key) is None
        await store.aclose()
    asyncio.run(run())


def test_an_unreachable_redis_is_a_503_not_a_crash() -> None:
    async def run() -> None:
        store = RedisConsoleSessions("redis://127.0.0.1:1/0", timeout_s=0.2)
        with pytest.raises(ServiceUnavailable) as exc:
            await store.get("anything")
        assert "127.0.0.1:1" not in exc.value.message
        await store.aclose()
    asyncio.run(run())


def test_memory_sessions_are_bounded() -> None:
    async def run() -> None:
        store = MemoryConsoleSessions(max_sessions=3)
        ids = []
        for _ in range(5):
            sid, session = new_session("k", "api_key", "f")
            await store.put(sid, session)
            ids.append(sid)
        assert [await store.get(sid) is not None for sid in ids] == [False, False, True, True, True]
    asyncio.run(run())
