"""The policy store's version anchor in Redis: the highest version written, kept outside the data folder.

`veil:policy:anchor:<store id>` holds the highest version any edge wrote for that store (raised by a Lua
"set if greater", so racing writers never lower it); `veil:policy:anchor:path:<sha256(store path)[:16]>` holds
the id of the store last anchored at that path. So a restored copy of the store and its high-water mark is
refused (its version is below the anchor), a store file swapped for another store is refused (the path names
another id), and a deleted store leaves a trace. The store id is sha256(salt)[:16]; no key name carries a secret.

The client is the synchronous one with short timeouts and one retry: the store checks the anchor when it loads
a changed file. Redis errors are logged by class only (a message may echo the URL, which can hold a password).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from veil.errors import PolicyStoreError

log = logging.getLogger("veil.admin.policy_anchor")

TIMEOUT_S = 0.5
_WARN_EVERY_S = 60.0
# KEYS[1] the version; ARGV[1] the version just written. Returns the anchored version after the call.
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local version = tonumber(ARGV[1])
if version > current then
  redis.call('SET', KEYS[1], version)
  return version
end
return current
"""


def path_key(store_path: Path) -> str:
    return f"veil:policy:anchor:path:{hashlib.sha256(str(Path(store_path).resolve()).encode()).hexdigest()[:16]}"


def _client(url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1))


class RedisAnchor:
    """One store's anchor (admin.policy_store.VersionAnchor); fail_open lets a load go on when Redis is away."""

    def __init__(self, url: str, store_id: str, *, store_path: Path, fail_open: bool = False,
                 timeout_s: float = TIMEOUT_S):
        self.store_id = store_id
        self.key = f"veil:policy:anchor:{store_id}"
        self.path_key = path_key(store_path)
        self.fail_open = fail_open
        self._redis = _client(url, timeout_s)
        self._raise = self._redis.register_script(_RAISE)
        self._warned_at = -math.inf

    def __repr__(self) -> str:
        return f"RedisAnchor({self.key!r})"  # never the URL

    def highest(self) -> int | None:
        """The anchored version; refuses a path that Redis ties to another store."""
        try:
            at_path, value = self._redis.get(self.path_key), self._redis.get(self.key)
        except (RedisError, OSError) as exc:
            if self.fail_open:
                self._warn(exc, "loading without the anchor (redis.fail_open)")
                return None
            raise PolicyStoreError(f"cannot check the policy store's version anchor: Redis is unreachable "
                                   f"({type(exc).__name__}); set redis.fail_open to load without it") from None
        if at_path is not None and _text(at_path) != self.store_id:
            raise PolicyStoreError(
                f"Redis anchors policy store {_text(at_path)} at this path, but the file here is store "
                f"{self.store_id}: it was replaced by another store. Put the right file back, or start over "
                "deliberately with `veil admin policy init --force` (after moving this file aside)")
        return None if value is None else int(value)

    def raise_to(self, version: int) -> None:
        """Raise the anchor (never lower it) and tie the path to this store. A failure is logged: the next load
        raises it, since a store ahead of its anchor is caught up then."""
        try:
            self._raise(keys=[self.key], args=[version])
            self._redis.set(self.path_key, self.store_id)
        except (RedisError, OSError) as exc:
            self._warn(exc, f"the anchor stays below version {version} until a later load raises it")

    def close(self) -> None:
        self._redis.close()

    def _warn(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("policy anchor: Redis is unreachable (%s); %s", type(exc).__name__, what)


def store_at(url: str, store_path: Path, *, fail_open: bool = False, timeout_s: float = TIMEOUT_S) -> str | None:
    """The id of the store Redis last anchored at `store_path`, or None: a trace of a store that may be gone."""
    client = _client(url, timeout_s)
    try:
        value = client.get(path_key(store_path))
    except (RedisError, OSError) as exc:
        if fail_open:
            log.warning("policy anchor: Redis is unreachable (%s); cannot look for an earlier store's anchor "
                        "(redis.fail_open)", type(exc).__name__)
            return None
        raise PolicyStoreError(f"cannot look for an earlier policy store's anchor: Redis is unreachable "
                               f"({type(exc).__name__}); set redis.fail_open to go on without it") from None
    finally:
        client.close()
    return None if value is None else _text(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
