"""API keys: high-entropy `sk-veil-<id>-<secret>` strings, shown once, stored as a SHA-256 hash.

The key id is public (it labels metrics and audit lines); only the hash of the whole key is
kept, and verification compares hashes in constant time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from typing import Any

PREFIX = "sk-veil-"
BOOTSTRAP_ID = "bootstrap"
_ID_BYTES, _SECRET_BYTES = 6, 32


@dataclasses.dataclass(slots=True)
class KeyRecord:
    """What the policy store holds for one key; `hash` never leaves the edge."""

    id: str
    name: str
    hash: str
    scopes: list[str]
    rpm: int | None = None
    tpm: int | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    expires_at: float | None = None
    revoked_at: float | None = None
    noise_rho: float | None = None  # embedding noise for this key's requests; None = deployment default
    max_concurrent: int | None = None  # concurrent generations; None = edge.max_concurrent_per_key

    def public(self) -> dict[str, Any]:
        """The admin API's view: everything but the hash, plus a display prefix."""
        out = dataclasses.asdict(self)
        del out["hash"]
        out["display"] = f"{PREFIX}{self.id}-…" if self.id != BOOTSTRAP_ID else "(bootstrap admin key)"
        out["active"] = self.usable(time.time())
        return out

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def hash_key(secret_key: str) -> str:
    return hashlib.sha256(secret_key.encode()).hexdigest()


def new_key_id() -> str:
    return secrets.token_hex(_ID_BYTES)


def new_secret(key_id: str) -> str:
    return f"{PREFIX}{key_id}-{secrets.token_urlsafe(_SECRET_BYTES)}"


def key_id_of(presented: str) -> str:
    """The id a presented key claims (`sk-veil-<id>-…`); any other string can only be the bootstrap key."""
    if presented.startswith(PREFIX):
        key_id, sep, _ = presented[len(PREFIX):].partition("-")
        if sep and key_id:
            return key_id
    return BOOTSTRAP_ID


def matches(record: KeyRecord, presented: str) -> bool:
    return hmac.compare_digest(record.hash, hash_key(presented))


def from_dict(data: dict[str, Any]) -> KeyRecord:
    fields = {f.name for f in dataclasses.fields(KeyRecord)}
    return KeyRecord(**{k: v for k, v in data.items() if k in fields})
