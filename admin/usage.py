"""Usage accounting: per principal (API key id, `jwt:<subject>`) and per UTC day, what an operator needs to
answer "who used how many tokens this week, and who was refused?". Counts only: never a prompt, a reply, a
token id or a key.

The edge counts into a `UsageLedger` (cheap, on the event loop); the ledger folds the counts in memory and
writes them to its store about once a second, and before every read, so a report includes what was counted
before it was asked for. The store follows the policy plane's durability rules: Redis when configured (edge
replicas share it), a SQLite file beside the encrypted policy store otherwise, and memory for the one local
user who runs without a policy store. A store that fails keeps its counts pending and retries: a Redis outage
delays usage, it does not lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Protocol

import anyio

from veil.errors import InvalidRequest, ServiceUnavailable

log = logging.getLogger("veil.admin.usage")

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "refused_401", "refused_403", "refused_429",
            "refused_policy", "protected_spans")
UNKNOWN = "unknown"  # a 401 whose credential names no key this edge knows
MAX_DAYS = 400  # how far back a report may reach; Redis forgets a day after this
FLUSH_S = 1.0

Counts = dict[str, int]
Batch = dict[tuple[str, str], Counts]  # (day, principal) -> counter -> increment


def today() -> datetime.date:
    return datetime.datetime.fromtimestamp(time.time(), datetime.timezone.utc).date()


_SINCE = re.compile(r"^(\d{1,3})d$")


def parse_since(text: str) -> datetime.date:
    """'7d' (the last 7 days, today included) or a UTC date 'YYYY-MM-DD', at most MAX_DAYS back."""
    now = today()
    if (m := _SINCE.match(text)) and int(m.group(1)) >= 1:
        day = now - datetime.timedelta(days=int(m.group(1)) - 1)
    else:
        try:
            day = datetime.date.fromisoformat(text)
        except ValueError:
            raise InvalidRequest("since must be a number of days such as '7d' or a date 'YYYY-MM-DD'",
                                 param="since") from None
    if day > now or (now - day).days >= MAX_DAYS:
        raise InvalidRequest(f"since must be within the last {MAX_DAYS} days", param="since")
    return day


def days_from(since: datetime.date) -> list[str]:
    now = today()
    return [(since + datetime.timedelta(days=i)).isoformat() for i in range((now - since).days + 1)]


def totals(rows: Iterable[dict[str, Any]]) -> Counts:
    out = dict.fromkeys(COUNTERS, 0)
    for row in rows:
        for name in COUNTERS:
            out[name] += row[name]
    return out


def _rows(found: dict[tuple[str, str], Counts]) -> list[dict[str, Any]]:
    return [{"day": day, "principal": who, **{c: counts.get(c, 0) for c in COUNTERS}}
            for (day, who), counts in sorted(found.items())]


class UsageStore(Protocol):
    async def add(self, batch: Batch) -> None: ...

    async def read(self, principal: str | None, since: datetime.date) -> dict[tuple[str, str], Counts]: ...

    async def aclose(self) -> None: ...


class MemoryUsageStore:
    """The embedded default for one local user without a policy store: gone when the edge stops."""

    def __init__(self) -> None:
        self._days: dict[tuple[str, str], Counts] = defaultdict(dict)

    async def add(self, batch: Batch) -> None:
        for where, counts in batch.items():
            mine = self._days[where]
            for name, n in counts.items():
                mine[name] = mine.get(name, 0) + n

    async def read(self, principal: str | None, since: datetime.date) -> dict[tuple[str, str], Counts]:
        first = since.isoformat()
        return {(day, who): dict(c) for (day, who), c in self._days.items()
                if day >= first and (principal is None or who == principal)}

    async def aclose(self) -> None:
        return None


class SqliteUsageStore:
    """A SQLite file beside the policy store: each flush is one transaction, so a crash never half-writes it."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, principal TEXT NOT NULL, "
                             "counter TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (day, principal, counter))")
        path.chmod(0o600)

    def _add(self, batch: Batch) -> None:
        values = [(day, who, name, n) for (day, who), counts in batch.items() for name, n in counts.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?) ON CONFLICT (day, principal, counter) "
                                     "DO UPDATE SET n = n + excluded.n", values)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, principal: str | None, since: datetime.date) -> dict[tuple[str, str], Counts]:
        query, args = "SELECT day, principal, counter, n FROM usage WHERE day >= ?", [since.isoformat()]
        if principal is not None:
            query, args = query + " AND principal = ?", args + [principal]
        found: dict[tuple[str, str], Counts] = defaultdict(dict)
        with self._lock:
            for day, who, name, n in self._db.execute(query, args):
                found[(day, who)][name] = n
        return found

    async def add(self, batch: Batch) -> None:
        await anyio.to_thread.run_sync(self._add, batch)

    async def read(self, principal: str | None, since: datetime.date) -> dict[tuple[str, str], Counts]:
        return await anyio.to_thread.run_sync(self._read, principal, since)

    async def aclose(self) -> None:
        with self._lock:
            self._db.close()


class RedisUsageStore:
    """One hash per UTC day, `veil:usage:<day>`, whose fields are `<principal>\\x1f<counter>`; replicas add to it
    with HINCRBY, and a day expires MAX_DAYS after its last write."""

    SEP = "\x1f"

    def __init__(self, url: str):
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    @staticmethod
    def _key(day: str) -> str:
        return f"veil:usage:{day}"

    async def add(self, batch: Batch) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for (day, who), counts in batch.items():
            for name, n in counts.items():
                pipe.hincrby(self._key(day), f"{who}{self.SEP}{name}", n)
        for day in {day for day, _ in batch}:
            pipe.expire(self._key(day), MAX_DAYS * 86400)
        await pipe.execute()

    async def read(self, principal: str | None, since: datetime.date) -> dict[tuple[str, str], Counts]:
        days = days_from(since)
        pipe = self._redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self._key(day))
        found: dict[tuple[str, str], Counts] = defaultdict(dict)
        for day, fields in zip(days, await pipe.execute()):
            for field, n in fields.items():
                who, _, name = field.decode().rpartition(self.SEP)
                if name in COUNTERS and (principal is None or who == principal):
                    found[(day, who)][name] = int(n)
        return found

    async def aclose(self) -> None:
        await self._redis.aclose()


class UsageLedger:
    """What the edge counts into. `count` never blocks and never fails a request; the counts reach the store
    within about FLUSH_S, before any report, and at shutdown."""

    def __init__(self, store: UsageStore, flush_s: float = FLUSH_S):
        self.store, self.flush_s = store, flush_s
        self._pending: Batch = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the timer's flushes, held until done
        self._flushing = asyncio.Lock()
        self._warned = False

    def count(self, principal: str, **counts: int) -> None:
        """Add to today's counters of `principal` (names from COUNTERS; zero increments are dropped)."""
        mine = self._pending.setdefault((today().isoformat(), principal), {})
        for name, n in counts.items():
            assert name in COUNTERS, name
            if n:
                mine[name] = mine.get(name, 0) + n
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop (a script): the next flush() writes them
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_s, self._flush_soon)

    def _flush_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Write the pending counts; on failure they stay pending (merged with newer ones) for the next try."""
        async with self._flushing:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch = {k: v for k, v in self._pending.items() if v}
            self._pending = {}
            if not batch:
                return
            try:
                await self.store.add(batch)
                self._warned = False
            except Exception as exc:  # Redis or disk down: keep the counts, warn once per outage
                for where, counts in batch.items():
                    mine = self._pending.setdefault(where, {})
                    for name, n in counts.items():
                        mine[name] = mine.get(name, 0) + n
                if not self._warned:
                    log.warning("usage counts not stored yet, will retry error=%s", type(exc).__name__)
                    self._warned = True
                self._schedule()

    async def rows(self, principal: str | None = None, since: datetime.date | None = None) -> list[dict[str, Any]]:
        """Rows {day, principal, <COUNTERS>} from `since` (default: the last 7 days), by day then principal."""
        await self.flush()
        try:
            found = await self.store.read(principal, since or parse_since("7d"))
        except Exception as exc:
            log.warning("usage store unreadable error=%s", type(exc).__name__)
            raise ServiceUnavailable("the usage store cannot be read right now; retry", code="usage_unavailable") \
                from None
        return _rows(found)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        await self.flush()
        await self.store.aclose()
