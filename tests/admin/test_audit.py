"""The keyed audit chain: a clean chain verifies; an edited, deleted, broken or forged line is named."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import re
from pathlib import Path

import pytest

from admin.audit import GENESIS, AuditLog, AuditLogError

PASS = "correct horse battery staple"
FAST_N = 2**10  # test-only scrypt cost; the default is memory-hard


def opened(path: Path, passphrase: str = PASS, **kw) -> AuditLog:
    return AuditLog(path, passphrase, scrypt_n=FAST_N, **kw)


def filled(path: Path, n: int = 5) -> AuditLog:
    log = opened(path)
    for i in range(n):
        log.record("key.created", actor="key_admin", request_id=f"req-{i}", key_id=f"key_{i}", rpm=60, ok=True)
    log.flush()
    return log


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def canonical(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def test_a_clean_chain_verifies(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit" / "audit.jsonl")
    verdict = log.verify()
    assert (verdict.ok, verdict.lines, verdict.bad_line) == (True, 6, None)
    init, first, *_, last = [json.loads(line) for line in lines(log.path)]
    assert init["event"] == "audit.init" and init["prev"] == GENESIS and init["seq"] == 1
    assert init["kdf"] == "scrypt" and init["n"] == FAST_N and len(init["salt"]) == 24
    assert first["prev"] == init["mac"] and first["seq"] == 2 and last["seq"] == 6
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert {k: first[k] for k in ("event", "actor", "request_id", "key_id", "rpm", "ok")} == {
        "event": "key.created", "actor": "key_admin", "request_id": "req-0", "key_id": "key_0", "rpm": 60, "ok": True}
    assert [r["seq"] for r in log.tail(2)] == [5, 6] and len(log.tail()) == 6 and log.tail(0) == []
    assert opened(tmp_path / "none.jsonl").verify().ok and opened(tmp_path / "none.jsonl").tail() == []
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"
    assert PASS not in log.path.read_text()


def test_an_edited_line_is_named(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl")
    text = lines(log.path)
    entry = json.loads(text[2])
    entry["actor"] = "someone_else"
    text[2] = canonical(entry)
    log.path.write_text("\n".join(text) + "\n")
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line, verdict.lines) == (False, 3, 2)
    assert "line 3" in verdict.reason and "edited" in verdict.reason


def _resealed(text: list[str], mac, start: int = 0) -> list[str]:
    """Rewrite the chain from line `start` (0-based) on with `mac`, as a forger would."""
    prev = json.loads(text[start - 1])["mac"] if start else GENESIS
    out = text[:start]
    for raw in text[start:]:
        entry = {k: v for k, v in json.loads(raw).items() if k != "mac"}
        entry["prev"] = prev
        if entry["event"] != "audit.init":
            entry["actor"] = "someone_else"
        entry["mac"] = prev = mac(canonical(entry).encode())
        out.append(canonical(entry))
    return out


def plain_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wrong_key(data: bytes) -> str:
    return hmac.new(b"\x01" * 32, data, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("mac", [plain_sha256, wrong_key], ids=["plain-sha256", "wrong-key"])
@pytest.mark.parametrize("start", [0, 1, 3])
def test_a_chain_recomputed_without_the_key_is_named_at_its_first_forged_line(tmp_path: Path, mac, start) -> None:
    log = filled(tmp_path / "audit.jsonl")
    log.path.write_text("\n".join(_resealed(lines(log.path), mac, start)) + "\n")
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line) == (False, start + 1)
    assert f"line {start + 1} " in verdict.reason and "failed authentication" in verdict.reason


def test_a_log_rewritten_under_another_passphrase_fails_at_line_1(tmp_path: Path) -> None:
    forged = filled(tmp_path / "forged.jsonl")  # the forger's own log, under a passphrase they chose
    forger = opened(tmp_path / "forged2.jsonl", "the forger's passphrase")
    for i in range(5):
        forger.record("key.created", actor="someone_else", key_id=f"key_{i}")
    forger.flush()
    real = opened(forged.path)
    forged.path.write_bytes(forger.path.read_bytes())
    verdict = real.verify()
    assert (verdict.ok, verdict.bad_line) == (False, 1) and "wrong passphrase" in verdict.reason
    with pytest.raises(AuditLogError, match="line 1 failed authentication: wrong passphrase"):
        real.open()


@pytest.mark.parametrize(("deleted", "named"), [(2, 2), (3, 3), (5, 5)])
def test_a_deleted_line_is_named(tmp_path: Path, deleted: int, named: int) -> None:
    log = filled(tmp_path / "audit.jsonl")
    text = lines(log.path)
    del text[deleted - 1]
    log.path.write_text("\n".join(text) + "\n")
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line) == (False, named)
    assert f"line {named} " in verdict.reason and "deleted" in verdict.reason


def test_deleting_the_first_line_is_named(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl")
    log.path.write_text("\n".join(lines(log.path)[1:]) + "\n")
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line) == (False, 1) and "not the first line of a keyed" in verdict.reason


def test_an_unkeyed_log_from_an_older_veil_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    entry = {"seq": 1, "ts": "2025-01-01T00:00:00.000Z", "event": "key.create", "actor": "a", "request_id": None,
             "prev": GENESIS}
    entry["hash"] = hashlib.sha256(canonical(entry).encode()).hexdigest()
    path.write_text(canonical(entry) + "\n")
    with pytest.raises(AuditLogError, match="not the first line of a keyed Veil audit log .* move the file aside"):
        opened(path).open()
    assert opened(path).holds_events()


def test_a_malformed_line_is_named_and_appends_continue(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl", 3)
    with open(log.path, "a") as f:
        f.write('{"seq": 5, "ts": "2025')  # a writer that died mid-line
    log.record("auth.failed", actor=None, reason="bad_key")
    log.flush()
    text = lines(log.path)
    appended = json.loads(text[5])
    assert len(text) == 6 and appended["seq"] == 5 and appended["prev"] == json.loads(text[3])["mac"]
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line) == (False, 5) and "not a well-formed" in verdict.reason
    assert [r["event"] for r in log.tail(2)] == ["key.created", "auth.failed"]


def test_record_takes_scalar_metadata_only(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.jsonl")
    with pytest.raises(TypeError, match="scalar"):
        log.record("x", scopes=["admin"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scalar"):
        log.record("x", actor={"id": 1})  # type: ignore[arg-type]
    for reserved in ("hash", "mac", "prev", "seq"):
        with pytest.raises(ValueError, match="reserved"):
            log.record("x", **{reserved: "f00"})
    with pytest.raises(ValueError, match="finite"):
        log.record("x", latency=float("nan"))
    with pytest.raises(ValueError):
        log.record("")
    log.flush()
    assert not log.path.exists()
    log.record("ratelimit.rejected", actor="key_1", limit="rpm", retry_after=1.5, forced=False, note=None,
               path="/v1/" + "x" * 5000)
    assert log.verify().ok
    assert len(log.tail(1)[0]["path"]) <= 520  # a client's long path is cut


def test_a_wrong_passphrase_is_refused_when_opened(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl", 1)
    with pytest.raises(AuditLogError, match="wrong passphrase"):
        opened(log.path, "not the passphrase").open()
    with pytest.raises(AuditLogError, match="passphrase"):
        AuditLog(log.path, "")


def _append(path: str, who: str, n: int, start) -> None:
    log = AuditLog(Path(path), PASS, scrypt_n=FAST_N)
    start.wait(30)  # both processes append at once
    for i in range(n):
        log.record("policy.blocked", actor=who, request_id=f"{who}-{i}", rule="g1")
        if i % 7 == 0:
            log.flush()  # several batches from each process, interleaved
    log.close()


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_append, args=(str(path), who, 50, start)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    verdict = opened(path).verify()
    assert (verdict.ok, verdict.lines) == (True, 101)
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == list(range(1, 102))
    assert [r["event"] for r in records].count("audit.init") == 1
    assert sorted(r["request_id"] for r in records[1:]) == sorted(f"{w}-{i}" for w in "ab" for i in range(50))


def test_holds_events(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.jsonl")
    assert not log.holds_events()
    log.open()
    assert log.path.exists() and not log.holds_events()  # only its first line
    log.record("key.create", actor="a")
    log.flush()
    assert log.holds_events()
