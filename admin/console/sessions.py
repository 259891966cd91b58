"""Console sessions: what a signed-in operator's cookie stands for, held server-side.

The admin key is forgotten after sign-in; a session holds the key id, a fingerprint of the key's stored
hash (rotating or revoking the key ends it), a CSRF token and its times. Stores never keep the session id
itself, only its SHA-256, so a dump of the store (or of Redis) opens no session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
import threading
import time
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from veil.errors import ServiceUnavailable

IDLE_S = 30 * 60  # a session unused this long ends
ABSOLUTE_S = 8 * 3600  # and every session ends this long after sign-in
_MAX_MEMORY_SESSIONS = 1000  # one local edge: beyond this the oldest sessions go first
REDIS_PREFIX = "veil:console:"


@dataclasses.dataclass(slots=True)
class ConsoleSession:
    key_id: str  # the signed-in key's id, or "local" when auth is off
    kind: str  # api_key | local: a session opened with auth off is worthless once auth is on
    fingerprint: str  # of the key record's stored hash (PolicyService.console_check)
    csrf: str  # the synchronizer token every form carries
    created: float  # unix times: the absolute limit runs from `created`, the idle one from `seen`
    seen: float

    def expired(self, now: float, idle_s: float, absolute_s: float) -> bool:
        return now - self.seen >= idle_s or now - self.created >= absolute_s

    def ttl(self, now: float, idle_s: float, absolute_s: float) -> float:
        """Seconds until this session ends unless it is used again."""
        return max(0.0, min(self.seen + idle_s, self.created + absolute_s) - now)


def new_session(key_id: str, kind: str, fingerprint: str) -> tuple[str, ConsoleSession]:
    """A fresh random session id (the cookie's value) and its session."""
    now = time.time()
    return secrets.token_urlsafe(32), ConsoleSession(key_id, kind, fingerprint, secrets.token_urlsafe(32), now, now)


def session_key(sid: str) -> str:
    """Where a store files a session: the SHA-256 of its id, never the id."""
    return hashlib.sha256(sid.encode()).hexdigest()


class ConsoleSessions(Protocol):
    async def put(self, sid: str, session: ConsoleSession) -> None: ...

    async def get(self, sid: str) -> ConsoleSession | None:
        """The live session of `sid` (its last use now recorded), or None when unknown or timed out."""
        ...

    async def end(self, sid: str) -> None: ...

    async def aclose(self) -> None: ...


class MemoryConsoleSessions:
    """One local edge: sessions in this process (a restart signs everyone out)."""

    def __init__(self, idle_s: float = IDLE_S, absolute_s: float = ABSOLUTE_S,
                 max_sessions: int = _MAX_MEMORY_SESSIONS):
        self.idle_s, self.absolute_s, self.max_sessions = idle_s, absolute_s, max_sessions
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()

    async def put(self, sid: str, session: ConsoleSession) -> None:
        now = time.time()
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.expired(now, self.idle_s, self.absolute_s)]:
                del self._sessions[key]
            while len(self._sessions) >= self.max_sessions:
                del self._sessions[min(self._sessions, key=lambda k: self._sessions[k].created)]
            self._sessions[session_key(sid)] = dataclasses.replace(session)

    async def get(self, sid: str) -> ConsoleSession | None:
        now, key = time.time(), session_key(sid)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            if session.expired(now, self.idle_s, self.absolute_s):
                del self._sessions[key]
                return None
            session.seen = now
            return dataclasses.replace(session)

    async def end(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(session_key(sid), None)

    async def aclose(self) -> None:
        with self._lock:
            self._sessions.clear()


class RedisConsoleSessions:
    """Edge replicas behind one load balancer: `veil:console:<sha256 of the id>` → the session's JSON, with a TTL
    that ends it when it times out."""

    def __init__(self, url: str, idle_s: float = IDLE_S, absolute_s: float = ABSOLUTE_S, timeout_s: float = 1.0):
        self.idle_s, self.absolute_s = idle_s, absolute_s
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              retry=Retry(NoBackoff(), 1))

    async def put(self, sid: str, session: ConsoleSession) -> None:
        ttl = session.ttl(time.time(), self.idle_s, self.absolute_s)
        await self._call(self._redis.set(REDIS_PREFIX + session_key(sid), _dump(session), px=_ms(ttl)))

    async def get(self, sid: str) -> ConsoleSession | None:
        key = REDIS_PREFIX + session_key(sid)
        raw = await self._call(self._redis.get(key))
        session = _load(raw) if raw is not None else None
        now = time.time()
        if session is None or session.expired(now, self.idle_s, self.absolute_s):
            return None
        session.seen = now
        # XX: a session ended meanwhile (sign-out on another replica) is not brought back
        await self._call(self._redis.set(key, _dump(session), px=_ms(session.ttl(now, self.idle_s, self.absolute_s)),
                                         xx=True))
        return session

    async def end(self, sid: str) -> None:
        await self._call(self._redis.delete(REDIS_PREFIX + session_key(sid)))

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _call(self, pending: Any) -> Any:
        try:
            return await pending
        except (RedisError, OSError) as exc:
            # no detail: a redis message may echo the URL, and with it a password
            raise ServiceUnavailable("console sessions are unavailable: Redis is unreachable",
                                     code="console_sessions_unavailable") from exc


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _dump(session: ConsoleSession) -> str:
    return json.dumps(dataclasses.asdict(session), separators=(",", ":"))


def _load(raw: bytes | str) -> ConsoleSession | None:
    """A stored session, or None for anything else under our prefix (it then counts as no session)."""
    try:
        data = json.loads(raw)
        session = ConsoleSession(**{f.name: data[f.name] for f in dataclasses.fields(ConsoleSession)})
    except (ValueError, TypeError, KeyError):
        return None
    texts = (session.key_id, session.kind, session.fingerprint, session.csrf)
    times = (session.created, session.seen)
    if not all(isinstance(t, str) for t in texts) or not all(isinstance(t, (int, float)) for t in times):
        return None
    return session
