"""The encrypted policy store: one AES-256-GCM file of keys, guardrails and settings, versioned and rollback-checked.

File layout: one JSON header line (format, scrypt params, salt, store version, nonce, ciphertext
length), a newline, then the raw ciphertext of {"version", "payload"}. The header bytes are the
AEAD associated data, so none of it can change unnoticed. The key comes from the passphrase with
scrypt under a salt fixed for the store's life (so scrypt runs once per process); every write
uses a fresh nonce and is atomic (temp file, fsync, rename, fsync the directory).

Beside it: `<path>.lock` serializes writers (fcntl.flock), and the high-water mark (`<path>.hwm`
unless given) holds the highest version seen under an HMAC, so an older copy put back is refused.
A present but unverifiable mark is refused; an absent one is accepted and recreated at the file's
version (a lost mark only loses rollback protection for copies older than that).

The mark sits beside the store, so a backup of both passes it. Two anchors outside the pair catch that:
- an optional `VersionAnchor` (admin.policy_anchor keeps one in Redis) holding the highest version written
  for this store id (sha256 of the salt, first 16 hex digits): a store below it is refused;
- an optional `AuditTrail` (admin.audit.AuditLog): each write appends `policy.version` {version, store} to the
  audit log and records the log's head (seq, mac, offset of the line before) inside the encrypted file. A load
  refuses a log that no longer holds that head (cut or replaced), and a store whose version is below one the
  verified log records after it.
Writes go store, mark, audit line, anchor; a crash between them leaves the store ahead of the others, and the
next load (under the lock) brings them up to it, as it does the mark.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from admin.kdf import MAX_SCRYPT_N, MIN_SCRYPT_N, SCRYPT_N, SCRYPT_P, SCRYPT_R, master_key, subkey, valid_n
from veil.errors import InvalidRequest, PolicyStoreError

log = logging.getLogger("veil.admin.policy_store")
T = TypeVar("T")

FORMAT, HWM_FORMAT, FORMAT_VERSION = "veil-policy-store", "veil-policy-hwm", 1
PAYLOAD_SHAPE: dict[str, type] = {"keys": dict, "guardrails": list, "settings": dict}
LOCK_TIMEOUT_S = 10.0
# A file modified this recently may change again without its stat changing (coarse mtime, inode reuse).
_RACY_NS = 2_000_000_000


class VersionAnchor(Protocol):
    """The highest version written for one store, kept where a copy of the data folder cannot reach."""

    def highest(self) -> int | None: ...  # None: nothing anchored yet; raises PolicyStoreError when unreadable

    def raise_to(self, version: int) -> None: ...  # never lowers it


AnchorFactory = Callable[[str], VersionAnchor]  # store id -> its anchor


class AuditTrail(Protocol):
    """What the store needs of the audit log (admin.audit.AuditLog)."""

    def appending(self, event: str, **fields: Any) -> ContextManager[dict[str, Any]]: ...

    def versions_since(self, store: str, head: dict[str, Any] | None) -> list[int]: ...


@dataclasses.dataclass(slots=True)
class _Cached:
    stat_key: tuple[int, int, int]  # mtime_ns, size, inode
    loaded_ns: int
    head: bytes
    version: int
    payload: dict[str, Any]
    store_id: str


class PolicyStore:
    """One encrypted, versioned policy file, shared by every edge replica that mounts it."""

    def __init__(self, path: Path, passphrase: str, *, hwm_path: Path | None = None, scrypt_n: int = SCRYPT_N,
                 lock_timeout: float = LOCK_TIMEOUT_S, anchor: AnchorFactory | None = None,
                 audit: AuditTrail | None = None):
        if not passphrase:
            raise PolicyStoreError("the policy store needs a passphrase (VEIL_POLICY_PASSPHRASE)")
        if not valid_n(scrypt_n):
            raise PolicyStoreError(f"scrypt n must be a power of two in [{MIN_SCRYPT_N}, {MAX_SCRYPT_N}]")
        self.path = Path(path)
        self.hwm_path = Path(hwm_path) if hwm_path is not None else self.path.with_name(self.path.name + ".hwm")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._passphrase = passphrase.encode()
        self._scrypt_n = scrypt_n  # used for a new store; an existing one keeps the n in its header
        self._lock_timeout = lock_timeout
        self._keys: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}  # (salt, n) -> (aead key, hmac key)
        self._cache: _Cached | None = None
        self._anchor_for = anchor
        self._anchors: dict[str, VersionAnchor] = {}
        self._audit = audit

    def __repr__(self) -> str:
        return f"PolicyStore({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.exists()

    def store_id(self) -> str:
        """The id the anchors and the audit log know this store by (from its salt; not a secret)."""
        return (self._cache or self._open(locked=False)).store_id

    def close(self) -> None:
        """Release the anchors' connections."""
        for anchor in self._anchors.values():
            close = getattr(anchor, "close", None)
            if close is not None:
                close()
        self._anchors.clear()

    def initialize(self, payload: dict) -> None:
        """Create a new store at version 1; refuse if one exists."""
        if not isinstance(payload, dict):
            raise PolicyStoreError("the policy payload must be a JSON object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.exists():
                raise PolicyStoreError(f"policy store {self.path} already exists")
            self.hwm_path.unlink(missing_ok=True)  # a mark left by a deleted store would refuse the new salt
            self._write(payload, 1, secrets.token_bytes(16), self._scrypt_n)
        log.info("policy store %s created", self.path)

    def load(self) -> tuple[int, dict]:
        """Read and verify the latest file; the payload returned is the caller's to change."""
        cached = self._open(locked=False)
        self._cache = cached
        return cached.version, json.loads(json.dumps(cached.payload))

    def current(self) -> tuple[int, dict]:
        """The cached view, reloaded only when the file changed; treat the payload as read-only."""
        c = self._cache
        if c is not None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                raise self._fail("does not exist") from None
            if _stat_key(st) == c.stat_key and (c.loaded_ns - st.st_mtime_ns > _RACY_NS or self._same_head(c, st)):
                return c.version, c.payload
        self._cache = self._open(locked=False)
        return self._cache.version, self._cache.payload

    def update(self, mutate: Callable[[dict], T]) -> T:
        """Under the lock: load the latest, let `mutate` edit it in place, write it as the next version."""
        return self._update(mutate)[0]

    def export_plain(self) -> dict:
        """{"version", "payload"} in plaintext for a backup; the caller decides where it goes."""
        version, payload = self.load()
        return {"version": version, "payload": payload}

    def import_plain(self, data: dict) -> int:
        """Replace the payload with an exported one as a new version (1 if no store exists yet)."""
        payload = data.get("payload") if isinstance(data, dict) else None
        if not isinstance(payload, dict) or any(not isinstance(payload.get(k), t) for k, t in PAYLOAD_SHAPE.items()):
            raise InvalidRequest('a policy import needs {"payload": ...} holding keys, guardrails and settings')
        if not self.exists():
            self.initialize(payload)
            return 1

        def replace(p: dict) -> None:
            p.clear()
            p.update(payload)

        version = self._update(replace)[1]
        log.info("policy store %s imported as version %d", self.path, version)
        return version

    # -- reading -----------------------------------------------------------------------------

    def _open(self, *, locked: bool) -> _Cached:
        """Verify the file and the mark; raise the mark (taking the lock) when the file is ahead of it."""
        # Mark before file: writers replace the file before the mark, so the file read is never older.
        hwm_raw = _read_optional(self.hwm_path)
        try:
            with open(self.path, "rb") as f:
                raw, st = f.read(), os.fstat(f.fileno())
        except FileNotFoundError:
            raise self._fail("does not exist; initialize it first") from None
        except OSError as exc:
            raise self._fail(f"cannot be read: {exc.strerror}") from exc
        header, head, ct = self._parse(raw)
        salt, n = _b64(header["salt"]), header["n"]
        aead_key, hmac_key = self._derive(salt, n)
        try:
            doc = json.loads(AESGCM(aead_key).decrypt(_b64(header["nonce"]), ct, head))
        except InvalidTag:
            raise self._fail("failed authentication: wrong passphrase or tampered file") from None
        version = header["version"]
        if not isinstance(doc, dict) or doc.get("version") != version or not isinstance(doc.get("payload"), dict):
            raise self._fail("is corrupt: its content does not match its header")
        seen = self._check_hwm(hwm_raw, header["salt"], hmac_key)
        if seen is not None and seen > version:
            raise self._fail(f"is version {version} but version {seen} was seen: an older copy was restored")
        sid = store_id(salt)
        anchor = self._anchor(sid)
        anchored = anchor.highest() if anchor is not None else None
        logged = self._audit.versions_since(sid, doc.get("audit")) if self._audit is not None else []
        ahead = (f"its anchor records version {anchored}" if anchored is not None and anchored > version
                 else f"the audit log records version {max(logged)}" if logged and max(logged) > version else None)
        if ahead is not None:
            # The anchor and the log are read after the file: without the lock, another replica may have written
            # the next version in between. Look again under the lock, where no write is half-done, before refusing.
            if not locked:
                with self._lock():
                    return self._open(locked=True)
            raise self._fail(f"is version {version} but {ahead}: an older copy was restored (with its high-water mark)")
        hwm_behind = seen is None or seen < version
        anchor_behind = anchor is not None and (anchored is None or anchored < version)
        unlogged = self._audit is not None and version not in logged
        if hwm_behind or anchor_behind or unlogged:
            if not locked:
                with self._lock():
                    return self._open(locked=True)
            if hwm_behind:
                if seen is None:
                    log.warning("policy store high-water mark %s was missing; recreated at version %d",
                                self.hwm_path, version)
                self._write_hwm(header["salt"], version, hmac_key)
            self._catch_up(sid, version, audit=unlogged, anchor=anchor if anchor_behind else None)
        return _Cached(_stat_key(st), time.time_ns(), head, version, doc["payload"], sid)

    def _catch_up(self, sid: str, version: int, *, audit: bool, anchor: VersionAnchor | None) -> None:
        """Bring the audit log and the anchor up to the store after a write that stopped half-way (lock held)."""
        if audit and self._audit is not None:
            log.warning("the audit log had no policy.version line for version %d of policy store %s; added it",
                        version, self.path)
            with self._audit.appending("policy.version", version=version, store=sid, late=True):
                pass
        if anchor is not None:
            anchor.raise_to(version)

    def _anchor(self, sid: str) -> VersionAnchor | None:
        if self._anchor_for is None:
            return None
        if sid not in self._anchors:
            self._anchors[sid] = self._anchor_for(sid)
        return self._anchors[sid]

    def _parse(self, raw: bytes) -> tuple[dict[str, Any], bytes, bytes]:
        head, sep, ct = raw.partition(b"\n")
        if not sep:
            raise self._fail("is truncated" if raw else "is empty (truncated)")
        try:
            h = json.loads(head)
            ok = (h["format"] == FORMAT and h["v"] == FORMAT_VERSION and h["kdf"] == "scrypt" and valid_n(h["n"])
                  and (h["r"], h["p"]) == (SCRYPT_R, SCRYPT_P) and len(_b64(h["salt"])) == 16
                  and len(_b64(h["nonce"])) == 12 and _is_int(h["version"]) and h["version"] >= 1
                  and _is_int(h["ct_len"]))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise self._fail("has a malformed header: not a Veil policy store, or tampered")
        if len(ct) < h["ct_len"]:
            raise self._fail(f"is truncated ({len(raw)} bytes, expected {len(head) + 1 + h['ct_len']})")
        if len(ct) > h["ct_len"]:
            raise self._fail("has unexpected bytes after its ciphertext: tampered file")
        return h, head, ct

    def _check_hwm(self, raw: bytes | None, salt_b64: str, hmac_key: bytes) -> int | None:
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            fields = {"format": doc["format"], "salt": doc["salt"], "version": doc["version"]}
            mac = doc["mac"]
        except (ValueError, KeyError, TypeError):
            fields, mac = {}, ""
        if fields and fields["salt"] != salt_b64:
            raise PolicyStoreError(f"policy store high-water mark {self.hwm_path} belongs to a different store; "
                                   "remove it only if the store was deliberately re-created")
        if not (fields and isinstance(mac, str) and _is_int(fields["version"])
                and hmac.compare_digest(mac, _mac(hmac_key, fields))):
            raise PolicyStoreError(f"policy store high-water mark {self.hwm_path} failed authentication: tampered file")
        return fields["version"]

    def _same_head(self, c: _Cached, st: os.stat_result) -> bool:
        """For a recently written file, compare the header line (a fresh nonce per write makes it unique)."""
        try:
            with open(self.path, "rb") as f:
                same = f.readline() == c.head + b"\n"
        except OSError:
            return False
        if same and time.time_ns() - st.st_mtime_ns > _RACY_NS:
            c.loaded_ns = time.time_ns()  # old enough now: later writes will change the stat
        return same

    # -- writing -----------------------------------------------------------------------------

    def _update(self, mutate: Callable[[dict], T]) -> tuple[T, int]:
        with self._lock():
            self._sweep_temps()
            c = self._open(locked=True)
            header = json.loads(c.head)
            payload = c.payload
            result = mutate(payload)  # if this raises, nothing has been written
            self._write(payload, c.version + 1, _b64(header["salt"]), header["n"])
        return result, c.version + 1

    def _write(self, payload: dict, version: int, salt: bytes, n: int) -> None:
        """Encrypt and atomically replace the store, then raise the mark, the audit log, the anchor and the cache
        (lock held)."""
        try:
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PolicyStoreError("the policy payload is not JSON-serializable") from exc
        aead_key, hmac_key = self._derive(salt, n)
        sid, salt_b64 = store_id(salt), base64.b64encode(salt).decode()
        trail: ContextManager[dict[str, Any] | None] = contextlib.nullcontext(None)
        if self._audit is not None:
            trail = self._audit.appending("policy.version", version=version, store=sid)
        with trail as audit_head:  # the audit line is appended when this block ends well, not before
            plain = json.dumps({"version": version, "payload": payload, "audit": audit_head}).encode()
            nonce = secrets.token_bytes(12)
            header = {"format": FORMAT, "v": FORMAT_VERSION, "kdf": "scrypt", "n": n, "r": SCRYPT_R, "p": SCRYPT_P,
                      "salt": salt_b64, "version": version, "nonce": base64.b64encode(nonce).decode(),
                      "ct_len": len(plain) + 16}  # GCM appends a 16-byte tag
            head = _canonical(header)
            self._atomic_write(self.path, head + b"\n" + AESGCM(aead_key).encrypt(nonce, plain, head))
            self._write_hwm(salt_b64, version, hmac_key)
        anchor = self._anchor(sid)
        if anchor is not None:
            anchor.raise_to(version)
        st = os.stat(self.path)
        self._cache = _Cached(_stat_key(st), time.time_ns(), head, version, json.loads(plain)["payload"], sid)
        log.info("policy store %s written at version %d", self.path, version)

    def _write_hwm(self, salt_b64: str, version: int, hmac_key: bytes) -> None:
        fields = {"format": HWM_FORMAT, "salt": salt_b64, "version": version}
        self._atomic_write(self.hwm_path, _canonical({**fields, "mac": _mac(hmac_key, fields)}) + b"\n")

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """Temp file in the same directory, fsync, rename over the target, fsync the directory."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PolicyStoreError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _sweep_temps(self) -> None:
        """Remove temp files a crashed writer left; safe because every writer holds the lock."""
        for target in (self.path, self.hwm_path):
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()
                    log.info("removed stale temp file %s", stale)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive flock on `<path>.lock`, polled so a stuck writer gives an error, not a hang."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PolicyStoreError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from exc
        try:
            deadline = time.monotonic() + self._lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise self._fail(f"is locked by another writer (waited {self._lock_timeout:g} s)") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _derive(self, salt: bytes, n: int) -> tuple[bytes, bytes]:
        """(AEAD key, HMAC key) from the passphrase; scrypt runs once per salt and n."""
        if (salt, n) not in self._keys:
            master = master_key(self._passphrase, salt, n)
            self._keys[(salt, n)] = (subkey(master, b"veil policy store aead"), subkey(master, b"veil policy store hwm"))
        return self._keys[(salt, n)]

    def _fail(self, what: str) -> PolicyStoreError:
        return PolicyStoreError(f"policy store {self.path} {what}")


def store_id(salt: bytes) -> str:
    """What the anchors and the audit log call a store: derived from its salt, so it names one store's life."""
    return hashlib.sha256(salt).hexdigest()[:16]


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(fields), hashlib.sha256).hexdigest()


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected base64 text")
    return base64.b64decode(value, validate=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
