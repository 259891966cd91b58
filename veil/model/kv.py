"""One sequence's KV cache, shared by the core's sessions, the edge-held layers and the audit."""

from __future__ import annotations

import enum
import time

import torch

_MIN_CAPACITY = 256


class SessionStatus(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Session:
    """One sequence's KV cache: k, v are [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, sid: str, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.sid = sid
        self.length = 0
        self.status = SessionStatus.OPEN
        self.last_used = time.monotonic()
        self._shape = (layers, kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        self.k = torch.empty(self._shape, dtype=dtype, device=device)
        self.v = torch.empty(self._shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, tokens: int, limit: int) -> None:
        """Grow (by doubling, up to `limit`) so that `tokens` positions fit."""
        if tokens <= self.capacity:
            return
        cap = min(max(_MIN_CAPACITY, self.capacity * 2, tokens), limit)
        layers, kv, _, hd = self._shape
        k = torch.empty((layers, kv, cap, hd), dtype=self._dtype, device=self._device)
        v = torch.empty_like(k)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
