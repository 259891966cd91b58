"""Opening the encrypted policy store with its audit log and anchor, and creating a store only on purpose.

A missing store is created in two cases only: by `veil admin policy init` (refused where a store exists, and,
without --force, where a trace of an earlier one remains), and on an edge's very first start, when nothing
shows that a store ever existed: no high-water mark, no audit log holding events, no anchor in Redis for this
store path (when Redis is configured). With a trace and no store the edge refuses to start, so deleting the
store (and its mark) can no longer reset every key, limit and guardrail to nothing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path

from admin.audit import AuditLog
from admin.kdf import SCRYPT_N
from admin.policy import EMPTY_POLICY
from admin.policy_store import PolicyStore, VersionAnchor
from veil.errors import PolicyStoreError
from veil.settings import Settings

log = logging.getLogger("veil.admin.policy_setup")


def _anchor_factory(settings: Settings, store_path: Path) -> Callable[[str], VersionAnchor] | None:
    if not settings.redis.url:
        return None
    from admin.policy_anchor import RedisAnchor

    url, fail_open = settings.redis.url, settings.redis.fail_open
    return lambda sid: RedisAnchor(url, sid, store_path=store_path, fail_open=fail_open)


def policy_parts(settings: Settings, *, scrypt_n: int = SCRYPT_N) -> tuple[PolicyStore, AuditLog]:
    """The store wired to its audit log and (with Redis) its anchor; nothing is opened yet. (scrypt_n: for tests.)"""
    path = settings.policy_store_path()
    audit = AuditLog(settings.audit_log_path(), settings.policy.passphrase, scrypt_n=scrypt_n)
    store = PolicyStore(path, settings.policy.passphrase, anchor=_anchor_factory(settings, path), audit=audit,
                        scrypt_n=scrypt_n)
    return store, audit


def traces(settings: Settings, store: PolicyStore, audit: AuditLog) -> list[str]:
    """What shows that a store existed here: its high-water mark, an audit log with events, an anchor in Redis."""
    found = []
    if store.hwm_path.exists():
        found.append(f"its high-water mark {store.hwm_path}")
    if audit.holds_events():
        found.append(f"the audit log {audit.path}")
    if settings.redis.url:
        from admin.policy_anchor import store_at

        if (sid := store_at(settings.redis.url, store.path, fail_open=settings.redis.fail_open)) is not None:
            found.append(f"its anchor in Redis (store {sid})")
    return found


def open_policy(settings: Settings, *, scrypt_n: int = SCRYPT_N) -> tuple[PolicyStore, AuditLog]:
    """The verified store and its audit log for an edge; a first start creates the store, a missing one refuses."""
    store, audit = policy_parts(settings, scrypt_n=scrypt_n)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        if found := traces(settings, store, audit):
            raise PolicyStoreError(
                f"policy store {store.path} is missing, but {' and '.join(found)} remain: it existed and was "
                "deleted or moved. Restore it (and its .hwm) from a backup, or start over deliberately with "
                "`veil admin policy init --force` (audited; every key, limit and guardrail is gone)")
        audit.open()  # a new log gets its first line before the store records the log's head
        _create(store, audit, actor="system", forced=False, found=[])
        log.info("first start: created a new policy store %s", store.path)
    store.load()  # refuse a tampered, truncated or rolled-back store now, not on the first request
    audit.open()
    return store, audit


def init_policy(settings: Settings, *, force: bool, scrypt_n: int = SCRYPT_N) -> tuple[str, list[str]]:
    """`veil admin policy init`: a new, empty store (its id is returned); with `force`, also over the traces of
    an earlier one (returned too)."""
    if not settings.policy.passphrase:
        raise PolicyStoreError("veil admin policy init needs VEIL_POLICY_PASSPHRASE")
    store, audit = policy_parts(settings, scrypt_n=scrypt_n)
    if store.exists():
        raise PolicyStoreError(f"policy store {store.path} exists; init never replaces a store (to start over, "
                               "move it aside first, then run init --force)")
    found = traces(settings, store, audit)
    if found and not force:
        raise PolicyStoreError(f"{' and '.join(found)} remain from an earlier store: restore that store from a "
                               "backup, or run `veil admin policy init --force` to start over deliberately")
    store.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        audit.open()
    except PolicyStoreError:
        if not force:
            raise
        moved = _move_aside(audit.path)  # unreadable with this passphrase: kept, not overwritten
        found.append(f"the unreadable audit log, moved to {moved}")
    _create(store, audit, actor="cli", forced=force, found=found)
    sid = store.store_id()
    audit.close()
    store.close()
    return sid, found


def _create(store: PolicyStore, audit: AuditLog, *, actor: str, forced: bool, found: list[str]) -> None:
    try:
        store.initialize(dict(EMPTY_POLICY))
    except PolicyStoreError:
        if not store.exists():
            raise
        return  # another edge created it first
    audit.record("policy.init", actor=actor, store=store.store_id(), forced=forced,
                 traces="; ".join(found) or None)
    audit.flush()


def _move_aside(path: Path) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.replaced-{stamp}")
    path.rename(target)
    return target
