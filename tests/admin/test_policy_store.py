"""The encrypted policy store: round trip, replicas, concurrency, tamper/truncation/rollback refusal, crash safety."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from admin.policy_store import SCRYPT_N, PolicyStore
from veil.errors import InvalidRequest, PolicyStoreError

PASS = "correct horse battery staple"
FAST_N = 2**10  # test-only scrypt cost; the default is memory-hard


def empty() -> dict:
    return {"keys": {}, "guardrails": [], "settings": {"counter": 0}}


def opened(path: Path, passphrase: str = PASS) -> PolicyStore:
    return PolicyStore(path, passphrase, scrypt_n=FAST_N)


def bump(payload: dict) -> int:
    payload["settings"]["counter"] += 1
    return payload["settings"]["counter"]


@pytest.fixture
def store(tmp_path: Path) -> PolicyStore:
    s = opened(tmp_path / "policy.store")
    s.initialize(empty())
    return s


def snapshot(s: PolicyStore) -> tuple[bytes, bytes]:
    return s.path.read_bytes(), s.hwm_path.read_bytes()


def test_round_trip(store: PolicyStore) -> None:
    payload = {"keys": {"k1": {"hash": "ab", "scopes": ["read"]}}, "guardrails": [{"id": "g1"}], "settings": {"x": 1}}
    store.update(lambda p: (p.clear(), p.update(payload)))
    assert store.exists() and not opened(store.path.with_name("other")).exists()
    assert opened(store.path).load() == (2, payload)
    assert b"k1" not in store.path.read_bytes() and b"guardrails" not in store.path.read_bytes()
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(PolicyStoreError, match="already exists"):
        store.initialize(empty())


def test_versions_increment_and_update_returns_the_result(store: PolicyStore) -> None:
    assert store.load()[0] == 1
    assert [store.update(bump) for _ in range(3)] == [1, 2, 3]
    assert store.load() == (4, {"keys": {}, "guardrails": [], "settings": {"counter": 3}})


def test_a_failing_mutation_writes_nothing(store: PolicyStore) -> None:
    before = snapshot(store)

    def boom(p: dict) -> None:
        p["settings"]["counter"] = 99
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.update(boom)
    with pytest.raises(PolicyStoreError, match="JSON-serializable"):
        store.update(lambda p: p.update(bad=object()))
    assert snapshot(store) == before and store.current() == (1, empty())


def test_replicas_see_each_others_updates_without_restart(store: PolicyStore) -> None:
    a, b = opened(store.path), opened(store.path)
    assert b.current() == (1, empty())
    assert b.current()[1] is b.current()[1]  # unchanged file: served from the cache
    for i in range(1, 6):  # back-to-back writes of equal size: the stat alone could miss these
        (a if i % 2 else b).update(bump)
        assert a.current()[1]["settings"]["counter"] == i
        assert b.current() == (i + 1, {"keys": {}, "guardrails": [], "settings": {"counter": i}})


def _increment(path: str, times: int, start) -> None:
    s = PolicyStore(Path(path), PASS, scrypt_n=FAST_N)
    start.wait(30)  # both processes write at once
    for _ in range(times):
        s.update(bump)


def test_concurrent_updates_from_two_processes_lose_nothing(store: PolicyStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_increment, args=(str(store.path), 20, start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    version, payload = store.current()
    assert (version, payload["settings"]["counter"]) == (41, 40)


@pytest.mark.parametrize("where", ["header", "ciphertext", "tag"])
def test_a_flipped_byte_is_refused_and_nothing_is_written(store: PolicyStore, where: str) -> None:
    store.update(bump)
    raw = bytearray(store.path.read_bytes())
    head_len = raw.index(b"\n")
    offset = {"header": raw.index(b'"version"') + len('"version":'), "ciphertext": head_len + 5, "tag": len(raw) - 1}
    raw[offset[where]] ^= 0x01
    store.path.write_bytes(raw)
    before = snapshot(store)
    for s in (store, opened(store.path)):
        with pytest.raises(PolicyStoreError, match="failed authentication|malformed|older copy"):
            s.load()
        with pytest.raises(PolicyStoreError):
            s.update(bump)
    assert snapshot(store) == before


@pytest.mark.parametrize("keep", [0, 30, -40, -1])
def test_a_truncated_file_is_refused(store: PolicyStore, keep: int) -> None:
    raw = store.path.read_bytes()
    store.path.write_bytes(raw[:keep] if keep >= 0 else raw[:len(raw) + keep])
    before = snapshot(store)
    with pytest.raises(PolicyStoreError, match="truncated"):
        opened(store.path).load()
    assert snapshot(store) == before


def test_an_older_copy_is_refused(store: PolicyStore) -> None:
    store.update(bump)
    v2 = store.path.read_bytes()
    store.update(bump)
    store.path.write_bytes(v2)
    before = snapshot(store)
    for s in (store, opened(store.path)):
        with pytest.raises(PolicyStoreError, match="is version 2 but version 3 was seen: an older copy was restored"):
            s.load()
        with pytest.raises(PolicyStoreError, match="older copy"):
            s.update(bump)
    with pytest.raises(PolicyStoreError, match="older copy"):
        store.current()
    assert snapshot(store) == before


def test_the_high_water_mark_file(store: PolicyStore, tmp_path: Path) -> None:
    store.update(bump)
    mark = json.loads(store.hwm_path.read_text())
    store.hwm_path.write_text(json.dumps({**mark, "version": 1}))  # lowered to let an older copy in
    with pytest.raises(PolicyStoreError, match="high-water mark .* failed authentication: tampered"):
        opened(store.path).load()
    store.hwm_path.unlink()  # absent: accepted and recreated at the file's version
    assert opened(store.path).load()[0] == 2
    assert json.loads(store.hwm_path.read_text())["version"] == 2
    elsewhere = tmp_path / "state" / "policy.hwm"
    elsewhere.parent.mkdir()
    s = PolicyStore(tmp_path / "p2", PASS, hwm_path=elsewhere, scrypt_n=FAST_N)
    s.initialize(empty())
    assert json.loads(elsewhere.read_text())["version"] == 1 and not (tmp_path / "p2.hwm").exists()


def test_a_wrong_passphrase_is_refused_clearly(store: PolicyStore) -> None:
    before = snapshot(store)
    with pytest.raises(PolicyStoreError, match="failed authentication: wrong passphrase or tampered file"):
        opened(store.path, "not the passphrase").load()
    assert snapshot(store) == before
    with pytest.raises(PolicyStoreError, match="passphrase"):
        PolicyStore(store.path, "")


def test_a_crash_before_the_rename_leaves_the_old_store(store: PolicyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.update(bump)
    before = snapshot(store)

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PolicyStoreError, match="cannot write"):
        store.update(bump)
    monkeypatch.undo()
    assert snapshot(store) == before
    assert opened(store.path).load() == (2, {"keys": {}, "guardrails": [], "settings": {"counter": 1}})
    assert not list(store.path.parent.glob("*.tmp"))


def test_a_crash_between_store_and_mark_catches_up(store: PolicyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.replace, []

    def replace_once(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) > 1:
            raise OSError(5, "I/O error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(PolicyStoreError):
        store.update(bump)
    monkeypatch.undo()
    assert json.loads(store.hwm_path.read_text())["version"] == 1
    assert opened(store.path).load()[0] == 2
    assert json.loads(store.hwm_path.read_text())["version"] == 2


def _die_mid_write(path: str) -> None:
    os.replace = lambda src, dst: os._exit(3)  # the process dies after the temp file is written and synced
    PolicyStore(Path(path), PASS, scrypt_n=FAST_N).update(bump)


def test_a_killed_writer_leaves_the_old_store_and_a_harmless_temp_file(store: PolicyStore) -> None:
    before = snapshot(store)
    proc = multiprocessing.get_context("spawn").Process(target=_die_mid_write, args=(str(store.path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    assert snapshot(store) == before and list(store.path.parent.glob(".policy.store.*.tmp"))
    assert opened(store.path).load() == (1, empty())
    assert store.update(bump) == 1 and opened(store.path).load()[0] == 2
    assert not list(store.path.parent.glob("*.tmp"))  # swept under the lock by the next writer


def test_export_import_round_trip(store: PolicyStore, tmp_path: Path) -> None:
    store.update(bump)
    backup = json.loads(json.dumps(store.export_plain()))
    assert backup == {"version": 2, "payload": {"keys": {}, "guardrails": [], "settings": {"counter": 1}}}
    store.update(bump)
    store.update(bump)
    assert store.import_plain(backup) == 5  # restored content, but as a new version
    assert store.load() == (5, backup["payload"])
    fresh = opened(tmp_path / "fresh.store")
    assert fresh.import_plain(backup) == 1 and fresh.load() == (1, backup["payload"])
    for bad in [{}, {"payload": []}, {"payload": {"keys": {}, "guardrails": {}, "settings": {}}}, []]:
        with pytest.raises(InvalidRequest):
            store.import_plain(bad)  # type: ignore[arg-type]
    assert store.load()[0] == 5


def test_the_default_kdf_is_memory_hard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert SCRYPT_N >= 2**15
    caplog.set_level(logging.DEBUG, logger="veil.admin")
    s = PolicyStore(tmp_path / "p", PASS)
    s.initialize({"keys": {"secret-key-id": {}}, "guardrails": [], "settings": {}})
    header = json.loads(s.path.read_bytes().split(b"\n", 1)[0])
    assert header["kdf"] == "scrypt" and header["n"] >= 2**15 and header["version"] == 1
    assert PolicyStore(tmp_path / "p", PASS).load()[1]["keys"] == {"secret-key-id": {}}
    assert PASS not in caplog.text and "secret-key-id" not in caplog.text and PASS not in repr(s)


# -- anchors outside the store and its mark: the audit log and a version anchor -------------------------------

class FakeAnchor:
    """An in-memory VersionAnchor, per store id (the Redis one is tested in test_policy_anchor.py)."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.up = True

    def __call__(self, sid: str) -> "FakeAnchor._One":
        return FakeAnchor._One(self, sid)

    class _One:
        def __init__(self, parent: "FakeAnchor", sid: str):
            self.parent, self.sid = parent, sid

        def highest(self) -> int | None:
            return self.parent.versions.get(self.sid)

        def raise_to(self, version: int) -> None:
            if self.parent.up:
                self.parent.versions[self.sid] = max(version, self.parent.versions.get(self.sid, 0))


def audited(tmp_path: Path, anchor: FakeAnchor | None = None, name: str = "policy.store"):
    from admin.audit import AuditLog

    audit = AuditLog(tmp_path / "audit.log", PASS, scrypt_n=FAST_N)
    return PolicyStore(tmp_path / name, PASS, scrypt_n=FAST_N, audit=audit, anchor=anchor), audit


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_write_appends_a_policy_version_line_with_no_secret(tmp_path: Path) -> None:
    s, audit = audited(tmp_path)
    s.initialize({"keys": {"key_1": {"hash": "ab" * 32}}, "guardrails": [{"terms": ["Dana Whitfield"]}],
                  "settings": {"counter": 0}})
    for _ in range(3):
        s.update(bump)
    versions = [x for x in audit_lines(audit.path) if x["event"] == "policy.version"]
    assert [(x["version"], x["store"]) for x in versions] == [(v, s.store_id()) for v in (1, 2, 3, 4)]
    assert re.fullmatch(r"[0-9a-f]{16}", s.store_id())
    text = audit.path.read_text()
    assert "ab" * 32 not in text and "Dana" not in text and PASS not in text and "key_1" not in text
    assert audit.verify().ok


def test_an_older_copy_restored_with_its_mark_is_refused_by_the_audit_log(tmp_path: Path) -> None:
    s, _ = audited(tmp_path)
    s.initialize(empty())
    s.update(bump)
    old = snapshot(s)  # version 2 and its mark
    s.update(bump)
    s.update(bump)
    s.path.write_bytes(old[0])
    s.hwm_path.write_bytes(old[1])
    for store in (s, audited(tmp_path)[0]):
        with pytest.raises(PolicyStoreError, match="is version 2 but the audit log records version 4: an older copy"):
            store.load()
        with pytest.raises(PolicyStoreError, match="older copy"):
            store.update(bump)
    assert snapshot(s) == old


def test_an_audit_log_cut_below_the_stores_head_is_refused(tmp_path: Path) -> None:
    s, audit = audited(tmp_path)
    s.initialize(empty())
    audit.record("key.create", actor="key_admin", key_id="k1")
    audit.flush()
    s.update(bump)  # its head is the key.create line
    audit.record("auth.failure", reason="invalid_api_key", path="/v1/models")
    audit.flush()
    text = audit.path.read_text().splitlines()
    head = next(i for i, x in enumerate(text) if '"key.create"' in x)
    audit.path.write_text("\n".join(text[:head]) + "\n")  # cut: the head line and everything after are gone
    with pytest.raises(PolicyStoreError, match="audit log .* no longer holds line 3, which the policy store recorded"):
        audited(tmp_path)[0].load()
    audit.path.unlink()
    with pytest.raises(PolicyStoreError, match="audit log .* is missing or empty, but the policy store recorded"):
        audited(tmp_path)[0].load()


def test_an_audit_log_edited_after_the_head_is_refused(tmp_path: Path) -> None:
    s, audit = audited(tmp_path)
    s.initialize(empty())
    s.update(bump)
    s.update(bump)
    text = audit.path.read_text().splitlines()
    last = json.loads(text[-1])
    assert last["event"] == "policy.version" and last["version"] == 3
    last["version"] = 2  # hide the newest version, to let an older copy in
    text[-1] = json.dumps(last)
    audit.path.write_text("\n".join(text) + "\n")
    with pytest.raises(PolicyStoreError, match="fails verification"):
        audited(tmp_path)[0].load()


def test_a_crash_before_the_audit_line_catches_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import admin.audit as audit_mod

    s, audit = audited(tmp_path)
    s.initialize(empty())
    real = audit_mod._write

    def fail_line(f, data: bytes) -> None:
        if b'"policy.version"' in data:
            raise OSError(5, "I/O error")
        real(f, data)

    monkeypatch.setattr(audit_mod, "_write", fail_line)
    with pytest.raises(OSError):
        s.update(bump)  # the store is written; its audit line is not
    monkeypatch.undo()
    audit.record("auth.failure", reason="invalid_api_key", path="/v1/models")  # other lines land meanwhile
    audit.flush()
    assert audited(tmp_path)[0].load()[0] == 2
    late = audit_lines(audit.path)[-1]
    assert (late["event"], late["version"], late["late"]) == ("policy.version", 2, True)
    assert audit.verify().ok and audited(tmp_path)[0].load()[0] == 2


def test_an_older_copy_restored_with_its_mark_and_audit_log_is_refused_by_the_anchor(tmp_path: Path) -> None:
    anchor = FakeAnchor()
    s, audit = audited(tmp_path, anchor)
    s.initialize(empty())
    s.update(bump)
    old, old_audit = snapshot(s), audit.path.read_bytes()  # the whole data folder, backed up at version 2
    s.update(bump)
    assert anchor.versions == {s.store_id(): 3}
    s.path.write_bytes(old[0])
    s.hwm_path.write_bytes(old[1])
    audit.path.write_bytes(old_audit)
    with pytest.raises(PolicyStoreError, match="is version 2 but its anchor records version 3: an older copy"):
        audited(tmp_path, anchor)[0].load()


def test_a_store_ahead_of_its_anchor_raises_it_on_load(tmp_path: Path) -> None:
    anchor = FakeAnchor()
    s, _ = audited(tmp_path, anchor)
    s.initialize(empty())
    anchor.up = False  # the write succeeds, the anchor misses it
    s.update(bump)
    assert anchor.versions[s.store_id()] == 1
    anchor.up = True
    assert audited(tmp_path, anchor)[0].load()[0] == 2
    assert anchor.versions[s.store_id()] == 2
