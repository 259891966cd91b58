"""The core's sessions by id, with explicit limits (sessions, tokens per session, idle time)."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

from veil.errors import NotFound, PayloadTooLarge, RateLimited
from veil.model.kv import Segment, Session


@dataclasses.dataclass(slots=True)
class _Held:
    session: Session
    last_used: float


class SessionTable:
    """Sessions by id; thread-safe because the HTTP loop closes while the runner steps."""

    def __init__(self, new_session: Callable[[int], Session], *, max_sessions: int, max_tokens: int,
                 idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.new_session = new_session  # limit -> an empty KV cache (DecoderStack.new_session)
        self.max_sessions, self.max_tokens, self.idle_seconds = max_sessions, max_tokens, idle_seconds
        self.clock = clock
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, sid: str, offset: int, new_tokens: int) -> Segment:
        """The segment a step at `offset` with `new_tokens` writes, in a session created or rolled back as needed."""
        end = offset + new_tokens
        if end > self.max_tokens:
            raise PayloadTooLarge(
                f"session would hold {end} tokens; the core's limit max_tokens_per_session is {self.max_tokens}",
                code="session_token_limit",
            )
        now = self.clock()
        with self._lock:
            held = self._held.get(sid)
            if held is None:
                if offset != 0:
                    raise NotFound("unknown session: it expired or was closed; start again at offset 0",
                                   code="session_not_found")
                if len(self._held) >= self.max_sessions:
                    self._expire_locked(now)
                if len(self._held) >= self.max_sessions:
                    raise RateLimited(f"the core holds its limit of max_sessions={self.max_sessions} sessions",
                                      code="session_limit")
                held = self._held[sid] = _Held(self.new_session(self.max_tokens), now)
            held.last_used = now
        return held.session.begin(offset, new_tokens)

    def close(self, sid: str) -> bool:
        with self._lock:
            return self._held.pop(sid, None) is not None

    def expire_idle(self) -> int:
        with self._lock:
            return self._expire_locked(self.clock())

    def _expire_locked(self, now: float) -> int:
        stale = [sid for sid, held in self._held.items() if now - held.last_used > self.idle_seconds]
        for sid in stale:
            del self._held[sid]
        return len(stale)
