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
    assert policy.set_limits(record["id"], 120, None)["rpm"] == 120


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
