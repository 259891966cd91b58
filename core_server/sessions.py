"""The core's sessions by id, with explicit limits (sessions, tokens per session, idle time)."""

from __future__ import annotations

import threading
import time

import torch

from veil.errors import Conflict, NotFound, PayloadTooLarge, RateLimited
from veil.model.kv import Session, SessionStatus


class SessionTable:
    """Sessions by id; thread-safe because the HTTP loop closes while the runner steps."""

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_sessions: int, max_tokens: int, idle_seconds: float):
        self._dims = (layers, kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.max_sessions, self.max_tokens, self.idle_seconds = max_sessions, max_tokens, idle_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def admit(self, sid: str, offset: int, new_tokens: int) -> Session:
        """The session a step at `offset` with `new_tokens` writes into, created or truncated as needed."""
        end = offset + new_tokens
        if end > self.max_tokens:
            raise PayloadTooLarge(
                f"session would hold {end} tokens; the core's limit max_tokens_per_session is {self.max_tokens}",
                code="session_token_limit",
            )
        with self._lock:
            sess = self._sessions.get(sid)
            if sess is None:
                if offset != 0:
                    raise NotFound("unknown session: it expired or was closed; start again at offset 0",
                                   code="session_not_found")
                if len(self._sessions) >= self.max_sessions:
                    self._expire_locked(time.monotonic())
                if len(self._sessions) >= self.max_sessions:
                    raise RateLimited(f"the core holds its limit of max_sessions={self.max_sessions} sessions",
                                      code="session_limit")
                sess = Session(sid, *self._dims, dtype=self._dtype, device=self._device)
                self._sessions[sid] = sess
            elif offset > sess.length:
                raise Conflict(f"step offset {offset} is past the session length {sess.length}")
        sess.length = min(sess.length, offset)  # offset < length rolls back (re-prefill, speculation)
        sess.reserve(end, self.max_tokens)
        sess.last_used = time.monotonic()
        return sess

    def close(self, sid: str) -> bool:
        with self._lock:
            sess = self._sessions.pop(sid, None)
        if sess is not None:
            sess.status = SessionStatus.CLOSED
        return sess is not None

    def expire_idle(self) -> int:
        with self._lock:
            return self._expire_locked(time.monotonic())

    def _expire_locked(self, now: float) -> int:
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_seconds]
        for sid in stale:
            self._sessions.pop(sid).status = SessionStatus.CLOSED
        return len(stale)

    def cached_tokens(self) -> int:
        with self._lock:
            return sum(s.length for s in self._sessions.values())
