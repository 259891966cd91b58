"""No silent re-creation: a missing store is created on a first start with no trace of an earlier one, or by
`veil admin policy init`; any trace (mark, audit log, Redis anchor) makes the edge refuse to start."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis

from admin.audit import AuditLog
from admin.plane import build_plane
from admin.policy_anchor import path_key
from admin.policy_setup import init_policy, open_policy
from tests.conftest import REDIS_URL
from veil.errors import PolicyStoreError
from veil.settings import Settings
from veil_cli.main import main

PASS = "correct horse battery staple"
FAST_N = 2**10



def settings_for(home: Path, redis_url: str = "") -> Settings:
    s = Settings(home=str(home))
    s.policy.passphrase = PASS
    s.redis.url = redis_url
    return s


def events(settings: Settings) -> list[dict]:
    return [json.loads(x) for x in settings.audit_log_path().read_text().splitlines()]


def forget(settings: Settings, *names: str) -> None:
    store = settings.policy_store_path()
    files = {"store": store, "hwm": store.with_name(store.name + ".hwm"), "audit": settings.audit_log_path()}
    for name in names:
        files[name].unlink()


def test_a_first_start_with_no_trace_creates_the_store_and_audits_it(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store, audit = open_policy(settings, scrypt_n=FAST_N)
    assert store.load()[0] == 1
    assert [e["event"] for e in events(settings)] == ["audit.init", "policy.version", "policy.init"]
    init = events(settings)[-1]
    assert (init["actor"], init["forced"], init["store"]) == ("system", False, store.store_id())
    assert open_policy(settings, scrypt_n=FAST_N)[0].load()[0] == 1  # the next start opens it
    audit.close()


@pytest.mark.parametrize("left", ["audit", "hwm", "redis"])
def test_a_missing_store_with_any_trace_refuses_to_start(tmp_path: Path, rdb: redis.Redis, left: str) -> None:
    settings = settings_for(tmp_path, REDIS_URL if left == "redis" else "")
    try:
        store, audit = open_policy(settings, scrypt_n=FAST_N)
        store.update(lambda p: p["settings"].update(x=1))
        audit.close()
        gone = {"audit": ("store", "hwm"), "hwm": ("store", "audit"), "redis": ("store", "hwm", "audit")}[left]
        forget(settings, *gone)
        with pytest.raises(PolicyStoreError) as exc:
            open_policy(settings, scrypt_n=FAST_N)
        message = exc.value.message
        assert f"policy store {store.path} is missing" in message
        assert {"audit": "the audit log", "hwm": "high-water mark", "redis": "its anchor in Redis"}[left] in message
        assert "Restore it (and its .hwm) from a backup" in message and "veil admin policy init --force" in message
        assert not store.exists()  # nothing was re-created
    finally:
        rdb.delete(path_key(settings.policy_store_path()))


def test_veil_edge_refuses_with_exit_code_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    env = {"VEIL_HOME": str(tmp_path), "VEIL_POLICY_PASSPHRASE": PASS, "VEIL_AUTH_ENABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = settings_for(tmp_path)
    open_policy(settings, scrypt_n=FAST_N)[1].close()
    forget(settings, "store", "hwm")
    assert main(["edge"]) == 2
    err = capsys.readouterr().err
    assert "veil edge: policy store" in err and "is missing" in err and "init --force" in err
    assert PASS not in err and "Traceback" not in err


def test_init_refuses_traces_or_a_store_and_force_starts_over_in_the_same_chain(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store, audit = open_policy(settings, scrypt_n=FAST_N)
    old_id = store.store_id()
    store.update(lambda p: p["settings"].update(x=1))
    audit.close()
    with pytest.raises(PolicyStoreError, match="exists; init never replaces a store"):
        init_policy(settings, force=True, scrypt_n=FAST_N)
    forget(settings, "store", "hwm")
    with pytest.raises(PolicyStoreError, match="the audit log .* remain from an earlier store"):
        init_policy(settings, force=False, scrypt_n=FAST_N)
    new_id, found = init_policy(settings, force=True, scrypt_n=FAST_N)
    assert new_id != old_id and len(found) == 1
    forced = events(settings)[-1]
    assert (forced["event"], forced["actor"], forced["forced"], forced["store"]) == ("policy.init", "cli", True, new_id)
    store, audit = open_policy(settings, scrypt_n=FAST_N)  # the old store's higher versions do not count
    assert store.load() == (1, {"keys": {}, "guardrails": [], "settings": {}})
    assert audit.verify().ok  # one chain across both stores' lives


def test_force_moves_an_audit_log_it_cannot_read_aside(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    settings.audit_log_path().write_text('{"seq":1,"hash":"00"}\n')  # an unkeyed log from an older Veil
    with pytest.raises(PolicyStoreError, match="remain from an earlier store"):
        init_policy(settings, force=False, scrypt_n=FAST_N)
    _, found = init_policy(settings, force=True, scrypt_n=FAST_N)
    assert any("moved to" in t for t in found)
    assert list(tmp_path.glob("audit.log.replaced-*")) and AuditLog(settings.audit_log_path(), PASS).verify().ok


def test_the_cli_init_works_on_the_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for k, v in {"VEIL_HOME": str(tmp_path), "VEIL_POLICY_PASSPHRASE": PASS}.items():
        monkeypatch.setenv(k, v)
    assert main(["admin", "policy", "init"]) == 0
    assert "created an empty policy store" in capsys.readouterr().out
    assert main(["admin", "policy", "init"]) == 2
    assert "exists; init never replaces a store" in capsys.readouterr().err
    store = tmp_path / "policy.store"
    store.unlink()
    store.with_name("policy.store.hwm").unlink()
    assert main(["admin", "policy", "init"]) == 2
    err = capsys.readouterr().err
    assert "remain from an earlier store" in err and "--force" in err
    assert main(["admin", "--json", "policy", "init", "--force"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forced"] is True and out["version"] == 1 and len(out["traces"]) == 1
    monkeypatch.delenv("VEIL_POLICY_PASSPHRASE")
    assert main(["admin", "policy", "init"]) == 2
    assert "VEIL_POLICY_PASSPHRASE" in capsys.readouterr().err
    assert PASS not in (tmp_path / "audit.log").read_text()


def test_build_plane_wires_the_audit_log_and_aclose_flushes_it(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    settings.auth.enabled = True
    plane = build_plane(settings)  # the default, memory-hard scrypt
    assert plane.bootstrap_secret and plane.audit is not None
    plane.audit.record("auth.failure", reason="invalid_api_key", path="/v1/models")
    asyncio.run(plane.aclose())
    text = settings.audit_log_path().read_text()
    assert '"key.bootstrap"' in text and '"auth.failure"' in text and plane.bootstrap_secret not in text
    assert PASS not in text
