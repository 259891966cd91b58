"""The usage ledger and its three stores (memory, SQLite, a real Redis), without an edge."""

from __future__ import annotations

import asyncio
import datetime
import secrets
import sqlite3
from pathlib import Path

import pytest

from admin.plane import usage_store
from admin.usage import (
    COUNTERS,
    MemoryUsageStore,
    RedisUsageStore,
    SqliteUsageStore,
    UsageLedger,
    parse_since,
    today,
    totals,
)
from tests.conftest import REDIS_URL
from veil.errors import InvalidRequest, ServiceUnavailable
from veil.settings import Settings


def test_since_is_a_number_of_days_or_a_date_within_the_window() -> None:
    now = today()
    assert parse_since("1d") == now and parse_since("7d") == now - datetime.timedelta(days=6)
    assert parse_since(now.isoformat()) == now
    for bad in ("", "0d", "7", "7w", "-1d", "401d", "2999-01-01", "1999-01-01", "yesterday"):
        with pytest.raises(InvalidRequest):
            parse_since(bad)


def _stores(tmp_path: Path) -> dict[str, object]:
    return {"memory": MemoryUsageStore(), "sqlite": SqliteUsageStore(tmp_path / "u.sqlite"),
            "redis": RedisUsageStore(REDIS_URL)}


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_counts_add_up_per_principal_and_day(kind: str, tmp_path: Path) -> None:
    async def run() -> None:
        ledger = UsageLedger(_stores(tmp_path)[kind], flush_s=0.01)  # type: ignore[arg-type]
        a, b = f"k{secrets.token_hex(4)}", f"jwt:sub|{secrets.token_hex(2)}"  # a separator-like char in a subject
        ledger.count(a, requests=1, prompt_tokens=10, completion_tokens=3)
        ledger.count(a, requests=1, prompt_tokens=5, completion_tokens=0, refused_429=1)
        ledger.count(b, refused_401=2, protected_spans=4)
        await asyncio.sleep(0.05)  # the timer's flush
        ledger.count(a, refused_policy=1)  # pending: rows() writes it first
        mine = await ledger.rows(a, today())
        assert mine == [{"day": today().isoformat(), "principal": a, "requests": 2, "prompt_tokens": 15,
                         "completion_tokens": 3, "refused_401": 0, "refused_403": 0, "refused_429": 1,
                         "refused_policy": 1, "protected_spans": 0}]
        both = [r for r in await ledger.rows(None, today()) if r["principal"] in (a, b)]
        assert [r["principal"] for r in both] == sorted([a, b])
        assert totals(both)["protected_spans"] == 4 and totals(both)["refused_401"] == 2
        await ledger.aclose()
    asyncio.run(run())


def test_a_failing_store_keeps_the_counts_until_it_answers_again() -> None:
    class Flaky(MemoryUsageStore):
        down = True

        async def add(self, batch):  # type: ignore[no-untyped-def]
            if self.down:
                raise ConnectionError("redis is down")
            await super().add(batch)

        async def read(self, principal, since):  # type: ignore[no-untyped-def]
            if self.down:
                raise ConnectionError("redis is down")
            return await super().read(principal, since)

    async def run() -> None:
        store = Flaky()
        ledger = UsageLedger(store, flush_s=0.01)
        ledger.count("k1", requests=1, prompt_tokens=7)
        await asyncio.sleep(0.05)
        ledger.count("k1", requests=1, prompt_tokens=3)
        with pytest.raises(ServiceUnavailable):  # a report cannot be made, and says so
            await ledger.rows("k1")
        store.down = False
        rows = await ledger.rows("k1")
        assert (rows[0]["requests"], rows[0]["prompt_tokens"]) == (2, 10)
        await ledger.aclose()
    asyncio.run(run())


def test_the_sqlite_file_survives_a_reopen_and_holds_only_counts(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"

    async def write() -> None:
        ledger = UsageLedger(SqliteUsageStore(path))
        ledger.count("k1", requests=3, completion_tokens=9)
        await ledger.aclose()  # the pending counts are written at close

    async def read() -> list[dict]:
        store = SqliteUsageStore(path)
        try:
            return await UsageLedger(store).rows("k1", today())
        finally:
            await store.aclose()
    asyncio.run(write())
    asyncio.run(write())
    rows = asyncio.run(read())
    assert (rows[0]["requests"], rows[0]["completion_tokens"]) == (6, 18)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(path) as db:
        assert {c for (c,) in db.execute("SELECT DISTINCT counter FROM usage")} <= set(COUNTERS)


def test_the_store_follows_the_policy_planes_rules(tmp_path: Path) -> None:
    s = Settings(home=str(tmp_path))
    assert isinstance(usage_store(s), MemoryUsageStore)
    s.policy.passphrase = "x" * 20
    store = usage_store(s)
    assert isinstance(store, SqliteUsageStore) and store.path == tmp_path / "policy.usage.sqlite"
    asyncio.run(store.aclose())
    s.redis.url = REDIS_URL
    redis_store = usage_store(s)
    assert isinstance(redis_store, RedisUsageStore)
    asyncio.run(redis_store.aclose())
