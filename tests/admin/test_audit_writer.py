"""Audit writes off the caller's thread: batched fsyncs, folded auth refusals, a bounded queue that sheds only
refusals, flush and close."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest

import admin.audit as audit_mod
from admin.audit import AuditLog, AuditLogError

PASS = "correct horse battery staple"
FAST_N = 2**10


def opened(path: Path, **kw) -> AuditLog:
    return AuditLog(path, PASS, scrypt_n=FAST_N, **kw)


def records(log: AuditLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


def test_record_neither_writes_nor_fsyncs_on_the_callers_thread(tmp_path: Path, monkeypatch) -> None:
    log = opened(tmp_path / "audit.log")
    log.open()
    caller, synced = threading.get_ident(), []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(threading.get_ident()), real(fd)))
    for i in range(500):
        log.record("ratelimit.reject", actor=f"key_{i % 3}", request_id=f"r{i}", limit="requests")
    log.flush()
    assert synced and caller not in synced
    assert len(synced) < 100  # batched: far fewer fsyncs than lines
    assert len(records(log)) == 501 and log.verify().ok
    log.close()


def test_ten_thousand_failed_auths_are_a_few_lines_and_never_block_the_loop(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.log")
    log.open()

    async def flood() -> tuple[float, float]:
        lag = 0.0

        async def ticker() -> None:
            nonlocal lag
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lag = max(lag, time.perf_counter() - t)

        tick = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        for i in range(10_000):
            log.record("auth.failure", request_id=f"req-{i}", reason=("invalid_api_key", "missing_api_key")[i % 2],
                       path=("/v1/chat/completions", "/v1/models")[i % 3 == 0])
            if i % 500 == 0:
                await asyncio.sleep(0)
        spent = (time.perf_counter() - t0) / 10_000
        await asyncio.sleep(0.01)
        tick.cancel()
        return spent, lag

    per_call, lag = asyncio.run(flood())
    assert per_call < 0.005, f"record() averaged {per_call * 1e3:.2f} ms"  # a sanity bound, not a benchmark
    assert lag < 1.0
    log.flush()
    lines = records(log)
    assert len(lines) <= 1 + 2 * 4  # init, then per (reason, path) one line and one count line
    folded = [x for x in lines if x["event"] == "auth.failure"]
    assert sum(x.get("count", 1) for x in folded) == 10_000
    assert all(x["count"] > 1000 for x in folded if "count" in x)
    assert log.verify().ok
    log.close()


def test_a_window_that_ends_writes_its_count_without_a_flush(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.log", window_s=0.3)
    log.open()
    for i in range(50):
        log.record("auth.failure", request_id=f"r{i}", reason="invalid_api_key", path="/v1/models")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(x.get("count") for x in records(log)):
        time.sleep(0.05)
    first, summary = [x for x in records(log) if x["event"] == "auth.failure"]
    assert first["request_id"] == "r0" and "count" not in first
    assert summary["count"] == 49 and summary["window_s"] == 0.3 and summary["path"] == "/v1/models"
    log.record("auth.failure", request_id="late", reason="invalid_api_key", path="/v1/models")
    log.flush()
    assert records(log)[-1]["request_id"] == "late" and "count" not in records(log)[-1]  # a new window
    assert log.verify().ok
    log.close()


def test_denials_fold_per_actor_scope_and_path_and_close_writes_the_counts(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.log")
    for _ in range(3):
        for actor in ("key_a", "key_b"):
            for scope in ("generate", "metrics"):
                log.record("auth.denied", actor=actor, scope=scope, path="/v1/chat/completions")
    log.record("key.create", actor="key_admin", key_id="key_c")  # never folded
    log.close()
    denied = [x for x in records(log) if x["event"] == "auth.denied"]
    assert len(denied) == 8  # 4 windows: the first line, then count=2
    assert {(x["actor"], x["scope"]) for x in denied} == {(a, s) for a in ("key_a", "key_b") for s in ("generate",
                                                                                                       "metrics")}
    assert sorted(x.get("count", 1) for x in denied) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [x["event"] for x in records(log)].count("key.create") == 1
    assert log.verify().ok


def test_a_flood_of_distinct_paths_is_bounded(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.log", max_windows=16)
    for i in range(5000):
        log.record("auth.failure", reason="invalid_api_key", path=f"/v1/random-{i}")
    log.flush()
    lines = [x for x in records(log) if x["event"] == "auth.failure"]
    assert len(lines) <= 16 + 2
    assert sum(x.get("count", 1) for x in lines) == 5000
    assert any(x.get("path") == "*" and x.get("count") for x in lines)
    log.close()


def test_a_full_queue_sheds_refusals_counted_and_makes_policy_events_wait(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(audit_mod, "WAIT_S", 10.0)
    log = opened(tmp_path / "audit.log", max_queue=8, lock_timeout=0.05)
    log.open()
    holder = open(log.path, "rb")
    fcntl.flock(holder, fcntl.LOCK_EX)  # the disk "stalls": the writer cannot append
    try:
        for i in range(200):
            log.record("ratelimit.reject", actor="key_a", request_id=f"r{i}", limit="requests")
        threading.Timer(0.5, holder.close).start()  # the stall ends while a policy event waits for room
        for i in range(20):
            log.record("key.create", actor="key_admin", key_id=f"key_{i}")  # waits, never dropped
    finally:
        holder.close()
    log.flush()
    lines = records(log)
    kept = [x for x in lines if x["event"] == "ratelimit.reject"]
    shed = [x for x in lines if x["event"] == "audit.shed"]
    assert [x["key_id"] for x in lines if x["event"] == "key.create"] == [f"key_{i}" for i in range(20)]
    assert shed and len(kept) + sum(x["count"] for x in shed) == 200 and len(kept) < 200
    assert log.verify().ok
    log.close()


def test_a_stuck_writer_is_an_error_for_policy_events_not_a_hang(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(audit_mod, "WAIT_S", 0.3)
    log = opened(tmp_path / "audit.log", max_queue=4, lock_timeout=0.05)
    log.open()
    accepted = 0
    with open(log.path, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(AuditLogError, match="not keeping up"):
            for i in range(10):
                log.record("guardrail.add", actor="key_admin", rule_id=f"g{i}")
                accepted += 1
        with pytest.raises(AuditLogError, match="not on disk"):
            log.flush(timeout=0.3)
    assert 4 <= accepted < 10
    log.flush()  # the stall is over: everything accepted is written, in order
    assert [x["rule_id"] for x in records(log) if x["event"] == "guardrail.add"] == [f"g{i}" for i in range(accepted)]
    log.close()


def test_close_stops_the_thread_and_a_later_record_starts_it_again(tmp_path: Path) -> None:
    log = opened(tmp_path / "audit.log")
    log.record("key.create", actor="a")
    thread = log._thread
    assert thread is not None and thread.is_alive()
    log.close()
    assert log._thread is None and not thread.is_alive()
    log.record("key.revoke", actor="a")
    log.close()
    assert [x["event"] for x in records(log)] == ["audit.init", "key.create", "key.revoke"]
    assert log.verify().ok
