"""Tamper-evident audit log: one HMAC-chained JSON line per admin action, refusal, policy block or store write.

Each line is the canonical JSON (sorted keys, compact) of {"seq", "ts", "event", "actor", "request_id",
...metadata, "prev", "mac"}, where "mac" is an HMAC-SHA256 of the line without it and "prev" is the previous
line's mac (64 zeros for the first). The key comes from the policy passphrase: scrypt under a salt that the
first line (`audit.init`, itself chained) carries, then HKDF; scrypt runs once per process, never per line.
Whoever can write the file but does not know the passphrase can neither edit a line nor recompute the chain:
`verify` names the first line that fails. Cutting lines off the end still leaves a valid shorter chain, so the
policy store records the log's head at every write and refuses a log cut below it (admin.policy_store).

`record` only checks and queues: one writer thread per process appends in batches, one fsync per batch, under
an fcntl.flock of the file (several edge processes share it). Repeated `auth.failure` and `auth.denied` are
folded: per (event, actor, reason or scope, path) the first in a window is written, the rest are counted and
written as one line with count=N when the window ends, on `flush` or on `close`. The queue is bounded: when it
fills, refusals (auth.*, ratelimit.reject) are shed and counted in one `audit.shed` line; any other event
(key.*, policy.*, guardrail.*) makes its caller wait for room, and is never dropped. `flush` blocks until all
queued lines are on disk; `close` flushes and stops the thread (a later `record` starts it again).

Lines are metadata only: the actor is a key id, never a secret, and callers must never pass prompt or reply text.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from admin.kdf import SCRYPT_N, SCRYPT_P, SCRYPT_R, master_key, subkey, valid_n
from veil.errors import AuditLogError, PolicyStoreError

log = logging.getLogger("veil.admin.audit")

FORMAT, FORMAT_VERSION, INIT_EVENT = "veil-audit-log", 2, "audit.init"
GENESIS = "0" * 64
RESERVED = frozenset({"seq", "ts", "event", "actor", "request_id", "prev", "mac", "hash"})
FOLDED = frozenset({"auth.failure", "auth.denied"})  # one line per window and key, then count=N
SHEDDABLE = FOLDED | {"ratelimit.reject"}  # refusals: dropped (and counted) when the queue is full
WINDOW_S = 60.0
MAX_QUEUE = 10_000
MAX_WINDOWS = 1024  # distinct fold keys at once; beyond, one window per event takes the rest
MAX_TEXT = 512  # longer string fields (a client's path) are cut
BATCH = 2048  # most lines per append and fsync
WAIT_S = 5.0  # an unsheddable event waits this long for room, a writer this long for the lock
FLUSH_S = 30.0
_RETRY_S = 0.5
_WARN_EVERY_S = 60.0
_BLOCK = 8192
_logs: weakref.WeakSet[AuditLog] = weakref.WeakSet()  # closed at exit, so nothing queued is lost


@dataclasses.dataclass(frozen=True, slots=True)
class AuditVerdict:
    """The outcome of `AuditLog.verify`: `lines` verified good, `bad_line` 1-based (None when the chain holds)."""

    ok: bool
    lines: int
    bad_line: int | None
    reason: str


@dataclasses.dataclass(slots=True)
class _Window:
    start: float  # time.monotonic() of the line that opened it
    fields: dict[str, Any]  # what the folded line repeats: event, actor, reason or scope, path
    count: int = 0  # refusals folded since the last line written for it


class AuditLog:
    """An append-only, HMAC-chained JSON-lines file shared by every process that appends to it."""

    def __init__(self, path: Path, passphrase: str, *, scrypt_n: int = SCRYPT_N, window_s: float = WINDOW_S,
                 max_queue: int = MAX_QUEUE, max_windows: int = MAX_WINDOWS, lock_timeout: float = WAIT_S):
        if not passphrase:
            raise AuditLogError("the audit log needs the policy passphrase (VEIL_POLICY_PASSPHRASE)")
        if not valid_n(scrypt_n):
            raise AuditLogError("scrypt n must be a power of two in the accepted range")
        self.path = Path(path)
        self._passphrase = passphrase.encode()
        self._scrypt_n = scrypt_n  # for a new log; an existing one keeps the n of its first line
        self._window_s, self._max_queue, self._max_windows = window_s, max_queue, max_windows
        self._shed_at = max(1, max_queue * 3 // 4)  # refusals stop here, leaving room for what must not be dropped
        self._lock_timeout = lock_timeout
        self._keys: dict[tuple[bytes, int], bytes] = {}
        self._key_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._windows: dict[tuple[Any, ...], _Window] = {}
        self._queued = self._written = self._shed = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._warned_at = -math.inf
        _logs.add(self)

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    # -- recording -----------------------------------------------------------------------------

    def record(self, event: str, *, actor: str | None = None, request_id: str | None = None,
               **fields: str | int | float | bool | None) -> None:
        """Queue one line; metadata only, never prompt text or secrets. Returns at once unless the queue is full."""
        entry = _entry(event, actor, request_id, fields)
        with self._cv:
            if event in FOLDED and self._fold(entry):
                return
            if event in SHEDDABLE:
                if len(self._queue) >= self._shed_at:
                    self._shed += 1
                    self._cv.notify_all()
                    return
            elif len(self._queue) >= self._max_queue:
                self._wait_for_room()
            self._push(entry)

    def flush(self, timeout: float = FLUSH_S) -> None:
        """Block until every line queued so far (and the counts folded so far) is on disk."""
        with self._cv:
            for window in self._windows.values():
                self._emit(window)
            if self._shed:
                self._push_shed()
            target = self._queued
            if self._written >= target:
                return
            self._start()
            if not self._cv.wait_for(lambda: self._written >= target, timeout):
                raise AuditLogError(f"audit log {self.path}: queued lines are not on disk after {timeout:g} s")

    def close(self, timeout: float = FLUSH_S) -> None:
        """Flush, then stop the writer thread."""
        self.flush(timeout)
        with self._cv:
            self._windows.clear()
            thread, self._stopping = self._thread, True
            self._cv.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._cv:
            self._stopping = False

    def open(self) -> None:
        """Check the first line (creating it for a new log) now: a wrong passphrase or foreign file is refused here."""
        with self._locked(fcntl.LOCK_EX, create=True) as f:
            self._chain_key(f)

    @contextlib.contextmanager
    def appending(self, event: str, **fields: str | int | float | bool | None) -> Iterator[dict[str, Any]]:
        """Hold the log's lock with the next line sealed; yield the head before it, {"seq", "mac", "offset"}.

        The line is written (and fsynced) when the block exits cleanly, so whoever records the head inside the
        block (the policy store) records a line that is on disk, and the next line is its own."""
        entry = _entry(event, None, None, fields)
        with self._locked(fcntl.LOCK_EX, create=True) as f:
            key = self._chain_key(f)
            seq, mac, offset, lead = _tail(f)
            yield {"seq": seq, "mac": mac, "offset": offset}
            line, _ = _seal(key, {**entry, "seq": seq + 1, "prev": mac})
            _write(f, lead + line + b"\n")

    # -- reading -------------------------------------------------------------------------------

    def tail(self, n: int = 20) -> list[dict]:
        """The last `n` well-formed lines, oldest first (after a flush)."""
        self.flush()
        if n <= 0 or not self.path.exists():
            return []
        out: list[dict] = []
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # no half-written line from a concurrent append
            for _, record in _records(f):
                out.append(record)
                if len(out) == n:
                    break
        return out[::-1]

    def verify(self) -> AuditVerdict:
        """Walk the chain from the first line (after a flush); name the first line that is malformed, forged or out
        of place."""
        self.flush()
        if not self.path.exists():
            return AuditVerdict(True, 0, None, "empty log")
        with self._locked(fcntl.LOCK_SH, create=False) as f:
            first = f.readline()
            if not first.strip():
                return AuditVerdict(True, 0, None, "empty log")
            key, why = self._first_line(first)
            if key is None:
                return self._bad(1, why)
            f.seek(0)
            prev, count = GENESIS, 0
            for count, raw in enumerate(f, start=1):
                if (problem := _check_line(key, raw, prev, count)) is not None:
                    return self._bad(count, problem)
                prev = json.loads(raw)["mac"]
        return AuditVerdict(True, count, None, f"{count} lines, chain intact")

    def versions_since(self, store: str, head: dict[str, Any] | None) -> list[int]:
        """The versions that verified `policy.version` lines record for `store`, after `head` (the whole log
        without one). Refuses a log that no longer holds `head` (cut or replaced) or whose lines after it fail."""
        try:
            with self._locked(fcntl.LOCK_SH, create=False) as f:
                key = self._read_key(f)
                if key is None:
                    raise FileNotFoundError
                return self._versions(f, key, store, head)
        except FileNotFoundError:
            if head is not None:
                raise AuditLogError(f"audit log {self.path} is missing or empty, but the policy store recorded its line "
                                    f"{head['seq']}: restore the audit log from a backup") from None
            return []

    def holds_events(self) -> bool:
        """Whether the log records anything beyond its first line (a trace of an earlier store); needs no key."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
                if not first.strip():
                    return False
                init = _parse(first.rstrip(b"\n"))
                return init is None or init.get("event") != INIT_EVENT or any(line.strip() for line in f)
        except FileNotFoundError:
            return False

    # -- the writer thread ---------------------------------------------------------------------

    def _fold(self, entry: dict[str, Any]) -> bool:
        """Count a refusal into its open window (True), or open one so this line is written (False); lock held."""
        now = time.monotonic()
        key: tuple[Any, ...] = (entry["event"], entry["actor"], entry.get("reason", entry.get("scope")),
                                entry.get("path"))
        fields: dict[str, Any] = {k: entry[k] for k in ("event", "actor", "reason", "scope", "path") if k in entry}
        if key not in self._windows and len(self._windows) >= self._max_windows:
            self._expire(now)
            if len(self._windows) >= self._max_windows:  # a flood of distinct paths: one window per event takes it
                key, fields = (entry["event"], "*"), {"event": entry["event"], "actor": None, "path": "*"}
        window = self._windows.get(key)
        if window is not None and now - window.start < self._window_s:
            window.count += 1
            if window.count == 1:
                self._cv.notify_all()  # the writer now has a window end to wake for
            return True
        if window is not None:
            self._emit(window)
        self._windows[key] = _Window(now, fields)
        return False

    def _emit(self, window: _Window) -> None:
        """Queue the line for what a window folded since its last line; lock held. Never shed."""
        if window.count:
            self._push({**window.fields, "count": window.count, "window_s": self._window_s, "ts": _now(),
                        "request_id": None})
            window.count = 0

    def _expire(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.start >= self._window_s:
                self._emit(window)
                del self._windows[key]

    def _push(self, entry: dict[str, Any]) -> None:
        self._queue.append(entry)
        self._queued += 1
        self._start()
        self._cv.notify_all()

    def _push_shed(self) -> None:
        self._push({"event": "audit.shed", "actor": None, "request_id": None, "count": self._shed, "ts": _now()})
        self._shed = 0

    def _wait_for_room(self) -> None:
        # blocking the caller (briefly) is the price of never dropping a policy change; a stuck disk is an error
        if not self._cv.wait_for(lambda: len(self._queue) < self._max_queue, WAIT_S):
            raise AuditLogError(f"audit log {self.path}: the writer is not keeping up (queue full for {WAIT_S:g} s)")

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="veil-audit-writer", daemon=True)
            self._thread.start()

    def _next_wake(self) -> float | None:
        ends = [w.start + self._window_s for w in self._windows.values() if w.count]
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    self._expire(time.monotonic())
                    if self._shed:
                        self._push_shed()
                    if self._queue or self._stopping:
                        break
                    self._cv.wait(self._next_wake())
                if not self._queue:
                    self._thread = None
                    self._cv.notify_all()
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._cv.notify_all()  # room for callers waiting on a full queue
            try:
                self._append(batch)
            except (OSError, PolicyStoreError) as exc:
                self._warn(exc)
                with self._cv:
                    self._queue.extendleft(reversed(batch))  # kept in order, retried
                time.sleep(_RETRY_S)
                continue
            with self._cv:
                self._written += len(batch)
                self._cv.notify_all()

    def _append(self, batch: list[dict[str, Any]]) -> None:
        with self._locked(fcntl.LOCK_EX, create=True) as f:
            key = self._chain_key(f)
            seq, mac, _, lead = _tail(f)
            out = bytearray(lead)
            for entry in batch:
                seq += 1
                line, mac = _seal(key, {**entry, "seq": seq, "prev": mac})
                out += line + b"\n"
            _write(f, bytes(out))

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            why = exc.message if isinstance(exc, PolicyStoreError) else getattr(exc, "strerror", None) or type(exc).__name__
            log.warning("audit log %s: cannot append (%s); lines are kept and retried", self.path, why)

    # -- the file and its key ------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, mode: int, *, create: bool) -> Iterator[IO[bytes]]:
        """The log opened and flocked, polled so a stuck holder gives an error, not a hang."""
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        else:
            fd = os.open(self.path, os.O_RDONLY)
        with os.fdopen(fd, "r+b" if create else "rb") as f:
            deadline = time.monotonic() + self._lock_timeout
            while True:
                try:
                    fcntl.flock(f, mode | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AuditLogError(f"audit log {self.path} is locked by another writer "
                                            f"(waited {self._lock_timeout:g} s)") from None
                    time.sleep(0.002)
            yield f  # closing the file releases the lock

    def _chain_key(self, f: IO[bytes]) -> bytes:
        """The chain key, from the log's first line; an empty log gets its first line now (lock held)."""
        key = self._read_key(f)
        return self._begin(f) if key is None else key

    def _read_key(self, f: IO[bytes]) -> bytes | None:
        """The chain key, from the log's first line; None for an empty log."""
        f.seek(0)
        first = f.readline()
        if not first.strip():
            return None
        key, why = self._first_line(first)
        if key is None:
            raise AuditLogError(f"audit log {self.path}: line 1 {why}")
        return key

    def _first_line(self, raw: bytes) -> tuple[bytes | None, str]:
        """(key, "") from a good first line, or (None, why not)."""
        init = _parse(raw.rstrip(b"\n"))
        params = _init_params(init)
        if init is None or params is None:
            return None, ("is not the first line of a keyed Veil audit log (an unkeyed log from an older Veil, or "
                          "another file): move the file aside to start a new log")
        key = self._derive(*params)
        if not hmac.compare_digest(init["mac"], _mac(key, init)):
            return None, "failed authentication: wrong passphrase, or the log was rewritten without the key"
        return key, ""

    def _begin(self, f: IO[bytes]) -> bytes:
        """Write the first line of a new log: the salt and cost its key comes from, chained like every line."""
        salt = secrets.token_bytes(16)
        key = self._derive(salt, self._scrypt_n)
        init = {"seq": 1, "ts": _now(), "event": INIT_EVENT, "actor": None, "request_id": None, "format": FORMAT,
                "v": FORMAT_VERSION, "kdf": "scrypt", "n": self._scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P,
                "salt": base64.b64encode(salt).decode(), "prev": GENESIS}
        _write(f, _seal(key, init)[0] + b"\n")
        return key

    def _derive(self, salt: bytes, n: int) -> bytes:
        with self._key_lock:  # scrypt once per salt, even with the writer thread and a store write racing
            if (salt, n) not in self._keys:
                self._keys[(salt, n)] = subkey(master_key(self._passphrase, salt, n), b"veil audit chain")
            return self._keys[(salt, n)]

    def _versions(self, f: IO[bytes], key: bytes, store: str, head: dict[str, Any] | None) -> list[int]:
        prev = GENESIS
        if head is not None:
            f.seek(head["offset"])
            at = _parse(f.readline().rstrip(b"\n"))
            if not (at and at["seq"] == head["seq"] and at["mac"] == head["mac"]
                    and hmac.compare_digest(at["mac"], _mac(key, at))):
                raise AuditLogError(f"audit log {self.path} no longer holds line {head['seq']}, which the policy store "
                                    "recorded at its last write: the log was cut, rewritten or replaced; restore it "
                                    "from a backup")
            prev = at["mac"]
        else:
            f.seek(0)
        found = []
        for raw in f:
            record = _parse(raw.rstrip(b"\n"))
            if record is None:
                continue  # a line a crashed writer left unfinished; the next line chains past it
            if record.get("prev") != prev or not hmac.compare_digest(record["mac"], _mac(key, record)):
                raise AuditLogError(f"audit log {self.path}: the line with seq {record['seq']} fails verification "
                                    "(edited, deleted or forged; `veil admin audit verify` names it)")
            prev = record["mac"]
            if record.get("event") == "policy.version" and record.get("store") == store \
                    and isinstance(record.get("version"), int):
                found.append(record["version"])
        return found

    def _bad(self, line: int, why: str) -> AuditVerdict:
        log.warning("audit log %s failed verification at line %d", self.path, line)
        return AuditVerdict(False, line - 1, line, f"line {line} {why}")


def _entry(event: str, actor: str | None, request_id: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """A checked line without its chain fields; over-long text is cut."""
    if clash := RESERVED & fields.keys():
        raise ValueError(f"audit fields {sorted(clash)} are reserved")
    if not isinstance(event, str) or not event:
        raise ValueError("an audit event needs a name")
    entry: dict[str, Any] = {**fields, "event": event, "actor": actor, "request_id": request_id}
    for name, value in entry.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"audit field {name!r} must be a scalar, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"audit field {name!r} must be finite")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            entry[name] = value[:MAX_TEXT] + "…"
    entry["ts"] = _now()
    return entry


def _init_params(init: dict | None) -> tuple[bytes, int] | None:
    """(salt, n) of a well-formed `audit.init` line, or None."""
    if not (isinstance(init, dict) and init.get("event") == INIT_EVENT and init.get("format") == FORMAT
            and init.get("v") == FORMAT_VERSION and init.get("kdf") == "scrypt" and valid_n(init.get("n"))
            and init.get("seq") == 1 and init.get("prev") == GENESIS and isinstance(init.get("salt"), str)):
        return None
    try:
        salt = base64.b64decode(init["salt"], validate=True)
    except ValueError:
        return None
    return (salt, init["n"]) if len(salt) == 16 else None


def _check_line(key: bytes, raw: bytes, prev: str, line: int) -> str | None:
    """Why line number `line` does not belong in the chain after `prev`, or None."""
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if not isinstance(entry, dict) or not isinstance(entry.get("mac"), str):
        return "is not a well-formed audit record (partial write or edit)"
    if not hmac.compare_digest(entry["mac"], _mac(key, entry)):
        return "failed authentication: it was edited, or forged without the key"
    if entry.get("prev") != prev:
        return "does not follow the line before it: a line was deleted or reordered"
    if entry.get("seq") != line:
        return f"has seq {entry.get('seq')!r}, expected {line}: a line is missing"
    return None


def _tail(f: IO[bytes]) -> tuple[int, str, int, bytes]:
    """(seq, mac, offset) of the last record, and the newline that closes a line a crashed writer left open."""
    seq, mac, offset = 0, GENESIS, 0
    for offset, record in _records(f):
        seq, mac = record["seq"], record["mac"]
        break
    end = f.seek(0, os.SEEK_END)
    lead = b""
    if end:
        f.seek(-1, os.SEEK_END)
        lead = b"" if f.read(1) == b"\n" else b"\n"
    return seq, mac, offset, lead


def _records(f: IO[bytes]) -> Iterator[tuple[int, dict]]:
    """(offset, record) from the last line backwards, skipping lines that are not records."""
    for offset, raw in _reverse_lines(f):
        if (record := _parse(raw)) is not None:
            yield offset, record


def _parse(raw: bytes) -> dict | None:
    """A chain record, or None for a line that is not one."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(entry, dict) and isinstance(entry.get("mac"), str) and isinstance(entry.get("seq"), int)
    return entry if ok else None


def _reverse_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(offset, line) from the end of the file backwards, read a block at a time (the log only grows)."""
    pos = f.seek(0, os.SEEK_END)
    rest = b""
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        parts = (f.read(step) + rest).split(b"\n")
        rest = parts[0]  # may continue in the block before
        start = pos + len(rest) + 1
        found = []
        for part in parts[1:]:
            found.append((start, part))
            start += len(part) + 1
        yield from ((at, line) for at, line in reversed(found) if line)
    if rest:
        yield 0, rest


def _seal(key: bytes, entry: dict[str, Any]) -> tuple[bytes, str]:
    """The line with its mac, and the mac."""
    mac = _mac(key, entry)
    return _canonical({**entry, "mac": mac}), mac


def _mac(key: bytes, entry: dict[str, Any]) -> str:
    return hmac.new(key, _canonical({k: v for k, v in entry.items() if k != "mac"}), hashlib.sha256).hexdigest()


def _write(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@atexit.register
def _close_all() -> None:
    for audit in list(_logs):
        with contextlib.suppress(Exception):
            audit.close(timeout=5.0)
