"""The hash-chained audit log: a clean chain verifies; an edited, deleted or broken line is named."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest

from admin.audit import GENESIS, AuditLog, _digest


def filled(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.record("key.created", actor="key_admin", request_id=f"req-{i}", key_id=f"key_{i}", rpm=60, ok=True)
    return log


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_a_clean_chain_verifies(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit" / "audit.jsonl")
    verdict = log.verify()
    assert (verdict.ok, verdict.lines, verdict.bad_line) == (True, 5, None)
    first, *_, last = [json.loads(line) for line in lines(log.path)]
    assert first["prev"] == GENESIS and first["seq"] == 1 and last["seq"] == 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert {k: first[k] for k in ("event", "actor", "request_id", "key_id", "rpm", "ok")} == {
        "event": "key.created", "actor": "key_admin", "request_id": "req-0", "key_id": "key_0", "rpm": 60, "ok": True}
    assert [r["seq"] for r in log.tail(2)] == [4, 5] and len(log.tail()) == 5 and log.tail(0) == []
    assert AuditLog(tmp_path / "none.jsonl").verify().ok and AuditLog(tmp_path / "none.jsonl").tail() == []
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"


def test_an_edited_line_is_named(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl")
    text = lines(log.path)
    entry = json.loads(text[2])
    entry["actor"] = "someone_else"
    text[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    log.path.write_text("\n".join(text) + "\n")
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line, verdict.lines) == (False, 3, 2)
    assert "line 3" in verdict.reason and "edited" in verdict.reason


def test_an_edit_with_a_recomputed_hash_is_caught_at_the_next_line(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl")
    text = lines(log.path)
    entry = json.loads(text[2])
    entry["actor"] = "someone_else"
    del entry["hash"]
    entry["hash"] = _digest(entry)
    text[2] = json.dumps(entry)
    log.path.write_text("\n".join(text) + "\n")
    assert log.verify().bad_line == 4


@pytest.mark.parametrize(("deleted", "named"), [(1, 1), (2, 2), (4, 4)])
def test_a_deleted_line_is_named(tmp_path: Path, deleted: int, named: int) -> None:
    log = filled(tmp_path / "audit.jsonl")
    text = lines(log.path)
    del text[deleted - 1]
    log.path.write_text("\n".join(text) + "\n")
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line) == (False, named)
    assert f"line {named} " in verdict.reason and "deleted" in verdict.reason


def test_a_malformed_line_is_named_and_appends_continue(tmp_path: Path) -> None:
    log = filled(tmp_path / "audit.jsonl", 3)
    with open(log.path, "a") as f:
        f.write('{"seq": 4, "ts": "2025')  # a writer that died mid-line
    log.record("auth.failed", actor=None, reason="bad_key")
    text = lines(log.path)
    appended = json.loads(text[4])
    assert len(text) == 5 and appended["seq"] == 4 and appended["prev"] == json.loads(text[2])["hash"]
    verdict = log.verify()
    assert (verdict.ok, verdict.bad_line) == (False, 4) and "not a well-formed" in verdict.reason
    assert [r["event"] for r in log.tail(2)] == ["key.created", "auth.failed"]


def test_record_takes_scalar_metadata_only(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(TypeError, match="scalar"):
        log.record("x", scopes=["admin"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scalar"):
        log.record("x", actor={"id": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        log.record("x", hash="f00")
    with pytest.raises(ValueError, match="finite"):
        log.record("x", latency=float("nan"))
    with pytest.raises(ValueError):
        log.record("")
    assert not log.path.exists()
    log.record("ratelimit.rejected", actor="key_1", limit="rpm", retry_after=1.5, forced=False, note=None)
    assert log.verify().ok


def _append(path: str, who: str, n: int, start) -> None:
    log = AuditLog(Path(path))
    start.wait(30)  # both processes append at once
    for i in range(n):
        log.record("policy.blocked", actor=who, request_id=f"{who}-{i}", rule="g1")


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
    verdict = AuditLog(path).verify()
    assert (verdict.ok, verdict.lines) == (True, 100)
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == list(range(1, 101))
    assert sorted(r["request_id"] for r in records) == sorted(f"{w}-{i}" for w in "ab" for i in range(50))
