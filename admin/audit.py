"""Tamper-evident audit log: one hash-chained JSON line per admin action, auth failure, 429 or policy block.

Each line is the canonical JSON (sorted keys, compact) of {"seq", "ts", "event", "actor",
"request_id", ...metadata, "prev", "hash"}, where "hash" is the SHA-256 of the line without it and
"prev" is the previous line's hash (64 zeros for the first). Editing a line breaks its hash;
deleting or reordering one breaks the next line's "prev" or "seq". Cutting lines off the end leaves
a valid shorter chain: anchor the last hash elsewhere to catch that.

Lines are metadata only: the actor is a key id, never a secret, and callers must never pass prompt
or reply text. Appends from several processes serialize on an fcntl.flock of the log file itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("veil.admin.audit")

GENESIS = "0" * 64
RESERVED = frozenset({"seq", "ts", "event", "actor", "request_id", "prev", "hash"})
_BLOCK = 8192


@dataclasses.dataclass(frozen=True, slots=True)
class AuditVerdict:
    """The outcome of `AuditLog.verify`: `lines` verified good, `bad_line` 1-based (None when the chain holds)."""

    ok: bool
    lines: int
    bad_line: int | None
    reason: str


class AuditLog:
    """An append-only, hash-chained JSON-lines file shared by every process that appends to it."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def record(self, event: str, *, actor: str | None = None, request_id: str | None = None,
               **fields: str | int | float | bool | None) -> None:
        """Append one line chained to the last; metadata only, never prompt text or secrets."""
        if clash := RESERVED & fields.keys():
            raise ValueError(f"audit fields {sorted(clash)} are reserved")
        for name, value in {"actor": actor, "request_id": request_id, **fields}.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"audit field {name!r} must be a scalar, not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"audit field {name!r} must be finite")
        if not isinstance(event, str) or not event:
            raise ValueError("an audit event needs a name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            last = next((r for r in map(_parse, _reverse_lines(f)) if r is not None), None)
            f.seek(0, os.SEEK_END)
            lead = b""
            if f.tell():
                f.seek(-1, os.SEEK_END)
                lead = b"" if f.read(1) == b"\n" else b"\n"  # close a line a crashed writer left open
            entry: dict[str, Any] = {**fields, "seq": last["seq"] + 1 if last else 1, "ts": _now(), "event": event,
                                     "actor": actor, "request_id": request_id,
                                     "prev": last["hash"] if last else GENESIS}
            entry["hash"] = _digest(entry)
            f.write(lead + _canonical(entry) + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def tail(self, n: int = 20) -> list[dict]:
        """The last `n` well-formed lines, oldest first."""
        if n <= 0 or not self.path.exists():
            return []
        out: list[dict] = []
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # no half-written line from a concurrent append
            for record in map(_parse, _reverse_lines(f)):
                if record is not None:
                    out.append(record)
                    if len(out) == n:
                        break
        return out[::-1]

    def verify(self) -> AuditVerdict:
        """Walk the chain from the first line; name the first line that is malformed, edited or out of place."""
        if not self.path.exists():
            return AuditVerdict(True, 0, None, "empty log")
        prev, count = GENESIS, 0
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            for count, raw in enumerate(f, start=1):
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
                    return self._bad(count, "is not a well-formed audit record (partial write or edit)")
                if entry["hash"] != _digest({k: v for k, v in entry.items() if k != "hash"}):
                    return self._bad(count, "was edited: its hash does not match its content")
                if entry.get("prev") != prev:
                    return self._bad(count, "does not follow the line before it: a line was deleted or reordered")
                if entry.get("seq") != count:
                    return self._bad(count, f"has seq {entry.get('seq')!r}, expected {count}: a line is missing")
                prev = entry["hash"]
        return AuditVerdict(True, count, None, f"{count} lines, chain intact")

    def _bad(self, line: int, why: str) -> AuditVerdict:
        log.warning("audit log %s failed verification at line %d", self.path, line)
        return AuditVerdict(False, line - 1, line, f"line {line} {why}")


def _parse(raw: bytes) -> dict | None:
    """A chain record, or None for a line that is not one."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("hash"), str) and isinstance(entry.get("seq"), int)
    return entry if ok else None


def _reverse_lines(f: IO[bytes]) -> Iterator[bytes]:
    """Lines from the end of the file backwards, read a block at a time (the log only grows)."""
    pos = f.seek(0, os.SEEK_END)
    rest = b""
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        parts = (f.read(step) + rest).split(b"\n")
        rest = parts[0]  # may continue in the block before
        yield from (line for line in reversed(parts[1:]) if line)
    if rest:
        yield rest


def _digest(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(entry)).hexdigest()


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
