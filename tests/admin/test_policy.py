"""Keys, scopes, limits and guardrails over the in-process store (the single-user default)."""

import time

import pytest

from admin import keys as apikeys
from admin.auth import LOCAL, Authenticator, require
from admin.policy import MemoryStore, PolicyService
from admin.principal import Scope
from veil.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied


@pytest.fixture
def policy() -> PolicyService:
    return PolicyService(MemoryStore())


def test_keys_are_prefixed_high_entropy_and_stored_only_as_hashes(policy: PolicyService) -> None:
    record, secret = policy.create_key("ci-bot", ["generate", "read"], rpm=60, tpm=20000)
    assert secret.startswith("sk-veil-" + record["id"] + "-") and len(secret) > 50
    stored = policy.store.current()[1]["keys"][record["id"]]
    assert secret not in str(stored) and stored["hash"] == apikeys.hash_key(secret)
    assert "hash" not in record and "hash" not in policy.list_keys()[0]
    p = policy.authenticate(secret)
    assert (p.key_id, p.rpm, p.tpm) == (record["id"], 60, 20000) and p.has(Scope.GENERATE)


def test_wrong_revoked_expired_and_rotated_keys_fail(policy: PolicyService) -> None:
    record, secret = policy.create_key("a", ["generate"])
    with pytest.raises(AuthenticationFailed, match="invalid API key"):
        policy.authenticate(secret[:-1] + ("x" if secret[-1] != "x" else "y"))
    _, new_secret = policy.rotate_key(record["id"])
    with pytest.raises(AuthenticationFailed):
        policy.authenticate(secret)
    assert policy.authenticate(new_secret).key_id == record["id"]
    policy.revoke_key(record["id"])
    with pytest.raises(AuthenticationFailed, match="revoked"):
        policy.authenticate(new_secret)
    short, s2 = policy.create_key("b", ["read"], expires_at=time.time() + 0.2)
    time.sleep(0.3)
    with pytest.raises(AuthenticationFailed, match="expired"):
        policy.authenticate(s2)


def test_bad_key_input_is_400_and_unknown_is_404(policy: PolicyService) -> None:
    with pytest.raises(InvalidRequest, match="scopes"):
        policy.create_key("a", ["root"])
    with pytest.raises(InvalidRequest, match="rpm"):
        policy.create_key("a", ["read"], rpm=-5)
    with pytest.raises(NotFound):
        policy.revoke_key("nope")
    record, _ = policy.create_key("a", ["read"])
    assert policy.set_limits(record["id"], {"rpm": 120})["rpm"] == 120
    for bad in ({}, {"rpm": "5"}, {"rpm": True}, {"burst": 3}, {"tpm": -1}):
        with pytest.raises(InvalidRequest):
            policy.set_limits(record["id"], bad)


def test_setting_one_limit_keeps_the_other_and_null_clears(policy: PolicyService) -> None:
    """`limits set KID --rpm 5` used to clear the key's tpm."""
    record, _ = policy.create_key("a", ["generate"], rpm=60, tpm=5000)
    assert (lambda r: (r["rpm"], r["tpm"]))(policy.set_limits(record["id"], {"rpm": 5})) == (5, 5000)
    assert (lambda r: (r["rpm"], r["tpm"]))(policy.set_limits(record["id"], {"tpm": None})) == (5, None)
    assert (lambda r: (r["rpm"], r["tpm"]))(policy.set_limits(record["id"], {"rpm": None, "tpm": 7})) == (None, 7)


def test_admin_implies_read_and_metrics_but_not_generate(policy: PolicyService) -> None:
    record, secret = policy.create_key("boss", ["admin"])
    boss = policy.authenticate(secret)
    assert boss.has(Scope.ADMIN) and boss.has(Scope.READ) and boss.has(Scope.METRICS)
    assert not boss.has(Scope.GENERATE)
    _, scraper = policy.create_key("prom", ["metrics"])
    assert policy.authenticate(scraper).has(Scope.METRICS) and not policy.authenticate(scraper).has(Scope.READ)


def test_bootstrap_admin_key_from_env_or_minted_once(policy: PolicyService) -> None:
    minted = policy.ensure_bootstrap("")
    assert minted and policy.authenticate(minted).has(Scope.ADMIN)
    assert policy.ensure_bootstrap("") is None  # an admin exists: nothing printed again
    other = PolicyService(MemoryStore())
    assert other.ensure_bootstrap("my-very-long-bootstrap-admin-key-123") is None
    assert other.authenticate("my-very-long-bootstrap-admin-key-123").key_id == apikeys.BOOTSTRAP_ID
    with pytest.raises(InvalidRequest):
        PolicyService(MemoryStore()).ensure_bootstrap("short")


async def _auth(a: Authenticator, headers: dict) -> object:
    return await a.authenticate(headers)


def test_authenticator_and_scope_guards(policy: PolicyService) -> None:
    import asyncio

    record, secret = policy.create_key("reader", ["read"])
    on = Authenticator(True, policy)
    p = asyncio.run(_auth(on, {"authorization": f"Bearer {secret}"}))
    require(p, Scope.READ)
    with pytest.raises(PermissionDenied, match="'generate' scope"):
        require(p, Scope.GENERATE)
    with pytest.raises(AuthenticationFailed, match="no API key"):
        asyncio.run(_auth(on, {}))
    with pytest.raises(AuthenticationFailed, match="Bearer"):
        asyncio.run(_auth(on, {"authorization": f"Basic {secret}"}))
    assert asyncio.run(_auth(Authenticator(False, policy), {})) is LOCAL


@pytest.mark.parametrize("payload", [
    {"keys": {"abc": 5}, "guardrails": [], "settings": {}},
    {"keys": {"abc": {"id": "other", "name": "n", "hash": "0" * 64, "scopes": ["read"]}}, "guardrails": [],
     "settings": {}},
    {"keys": {"abc": {"id": "abc", "name": "n", "hash": "xyz", "scopes": ["read"]}}, "guardrails": [], "settings": {}},
    {"keys": {"abc": {"id": "abc", "name": "n", "hash": "0" * 64, "scopes": ["root"]}}, "guardrails": [],
     "settings": {}},
    {"keys": {"abc": {"id": "abc", "name": "n", "hash": "0" * 64, "scopes": ["read"], "rpm": -1}},
     "guardrails": [], "settings": {}},
    {"keys": {}, "guardrails": ["block everything"], "settings": {}},
    {"keys": {}, "guardrails": [{"id": "x", "action": "block", "pattern": 5}], "settings": {}},
    {"keys": {}, "guardrails": [{"id": "x", "action": "block", "pattern": "("}], "settings": {}},
    {"keys": {}, "guardrails": [{"id": "x", "action": "block", "terms": ["a"]},
                                {"id": "x", "action": "block", "terms": ["b"]}], "settings": {}},
    {"keys": [], "guardrails": [], "settings": {}},
])
def test_an_import_with_a_malformed_record_is_refused_and_changes_nothing(payload: dict) -> None:
    """Such a record used to be stored as it was, and every later request (auth, guardrails) failed on it."""
    service = PolicyService(MemoryStore())
    _, secret = service.create_key("kept", ["read"])
    before = service.store.current()
    with pytest.raises(InvalidRequest):
        service.import_policy({"payload": payload})
    assert service.store.current() == before and service.authenticate(secret).key_id


def test_an_export_imports_back() -> None:
    service = PolicyService(MemoryStore())
    _, secret = service.create_key("kept", ["read", "generate"], rpm=5, max_concurrent=2)
    service.add_guardrail({"id": "g", "action": "block", "terms": ["secret plan"]})
    exported = service.store.export_plain()
    other = PolicyService(MemoryStore())
    other.import_policy(exported)
    assert other.authenticate(secret).max_concurrent == 2 and other.list_guardrails()[0]["id"] == "g"


def test_a_stored_rule_that_todays_checks_refuse_is_a_503_naming_it_until_removed() -> None:
    """An older store may hold an output rule with an unbounded match: it cannot be enforced as written."""
    from veil.errors import PolicyStoreError

    legacy = {"id": "old-out", "action": "block", "pattern": "secret.*", "terms": [], "applies_to": ["output"]}
    service = PolicyService(MemoryStore({"keys": {}, "guardrails": [legacy], "settings": {}}))
    with pytest.raises(PolicyStoreError) as exc:
        service.guardrails()
    assert exc.value.status_code == 503 and "old-out" in exc.value.message and "secret" not in exc.value.message
    service.remove_guardrail("old-out")
    assert service.guardrails().output_rules == []
