"""Hellos seen within the handshake window, so that a recorded hello cannot be played again.

Each replica remembers the digests it has seen; with a locker, Redis (SET NX) shares them, so a
hello recorded on its way to one replica is refused by every other too.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import redis

from veil.channel import HELLO_WINDOW_SECONDS
from veil.errors import AuthenticationFailed


class ReplayGuard:
    def __init__(self, client: redis.Redis | None = None, clock: Callable[[], float] = time.time):
        self.client, self.clock = client, clock
        self._seen: dict[bytes, float] = {}  # digest -> when it may be forgotten
        self._lock = threading.Lock()

    def check(self, digest: bytes) -> None:
        """Remember `digest`; 401 if it was seen before."""
        now = self.clock()
        keep = 2 * HELLO_WINDOW_SECONDS  # a hello is valid from ts - window to ts + window
        with self._lock:
            for d in [d for d, until in self._seen.items() if until < now]:
                del self._seen[d]
            if digest in self._seen:
                raise AuthenticationFailed("this hello was seen before", code="hello_replayed")
            self._seen[digest] = now + keep
        if self.client is not None:
            try:
                fresh = self.client.set(b"veil:hello:" + digest.hex().encode(), b"1", nx=True, ex=int(keep))
            except redis.RedisError:
                return  # this replica's memory still refuses replays to it
            if not fresh:
                raise AuthenticationFailed("this hello was seen before", code="hello_replayed")
