"""The policy plane's operations over the policy store: keys, limits, guardrails, export/import.

The store is the encrypted file (admin.policy_store) or, for a single local user without a
passphrase, an in-process dict; both hold one JSON payload:
{"keys": {id: KeyRecord}, "guardrails": [GuardrailRule], "settings": {}}.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

from admin import keys as apikeys
from admin.guardrails import GuardrailRule, Guardrails, rule_from_dict
from admin.principal import Principal, Scope
from veil.errors import AuthenticationFailed, InvalidRequest, NotFound, PolicyStoreError

T = TypeVar("T")
EMPTY_POLICY: dict[str, Any] = {"keys": {}, "guardrails": [], "settings": {}}
SCOPES = {s.value for s in Scope}


class Store(Protocol):
    def current(self) -> tuple[int, dict]: ...

    def update(self, mutate: Callable[[dict], T]) -> T: ...

    def export_plain(self) -> dict: ...

    def import_plain(self, data: dict) -> int: ...


class MemoryStore:
    """The embedded default for one local user: the same interface, nothing on disk."""

    def __init__(self, payload: dict | None = None):
        self._version, self._payload = 1, copy.deepcopy(payload or EMPTY_POLICY)
        self._lock = threading.Lock()

    def current(self) -> tuple[int, dict]:
        return self._version, self._payload

    def update(self, mutate: Callable[[dict], T]) -> T:
        with self._lock:
            draft = copy.deepcopy(self._payload)
            result = mutate(draft)
            self._payload, self._version = draft, self._version + 1
            return result

    def export_plain(self) -> dict:
        return {"version": self._version, "payload": copy.deepcopy(self._payload)}

    def import_plain(self, data: dict) -> int:
        payload = data.get("payload")
        if not isinstance(payload, dict) or set(payload) != set(EMPTY_POLICY):
            raise InvalidRequest("an import needs a payload with keys, guardrails and settings")

        def replace(draft: dict) -> None:
            draft.clear()
            draft.update(copy.deepcopy(payload))
        self.update(replace)
        return self._version


def _stored_rule(data: dict[str, Any]) -> GuardrailRule:
    """A rule from the store. One that today's checks refuse (written by an older Veil, such as an output rule
    with an unbounded match) cannot be enforced as written, so the edge serves nothing until it is fixed: a
    503 naming the rule, rather than a policy quietly not applied or a 400 blaming the client."""
    try:
        return rule_from_dict(data)
    except InvalidRequest as exc:
        rule_id = data.get("id", "?")
        raise PolicyStoreError(f"the stored guardrail '{rule_id}' is no longer valid ({exc.message}); remove or "
                               f"replace it: veil admin guardrails remove {rule_id}") from None


def check_payload(payload: dict[str, Any]) -> None:
    """A policy payload whose every key record and guardrail rule is well-formed (an import's gate)."""
    keys, rules, settings = payload.get("keys"), payload.get("guardrails"), payload.get("settings")
    if not isinstance(keys, dict) or not isinstance(rules, list) or not isinstance(settings, dict):
        raise InvalidRequest("the payload needs 'keys' (an object), 'guardrails' (an array) and 'settings' (an object)")
    for key_id, record in keys.items():
        where = f"keys.{key_id}"
        if not isinstance(record, dict) or record.get("id") != key_id or not isinstance(record.get("name"), str):
            raise InvalidRequest(f"{where} must be a key record whose id is its name in 'keys'", param=where)
        if not (isinstance(record.get("hash"), str) and re.fullmatch(r"[0-9a-f]{64}", record["hash"])):
            raise InvalidRequest(f"{where}.hash must be a SHA-256 hex digest", param=where)
        if not isinstance(record.get("scopes"), list):
            raise InvalidRequest(f"{where}.scopes must be a list", param=where)
        _check_scopes(record["scopes"])
        for name in LIMITS:
            _check_limit(record.get(name), f"{where}.{name}")
        for name in ("created_at", "expires_at", "revoked_at"):
            value = record.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InvalidRequest(f"{where}.{name} must be a unix time or null", param=where)
        _check_noise(record.get("noise_rho"))
    ids = set()
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise InvalidRequest(f"guardrails[{i}] must be an object", param=f"guardrails[{i}]")
        try:
            checked = rule_from_dict(rule)
        except (TypeError, AttributeError, ValueError):  # fields of the wrong type
            raise InvalidRequest(f"guardrails[{i}] is not a guardrail rule", param=f"guardrails[{i}]") from None
        if checked.id in ids:
            raise InvalidRequest(f"guardrails[{i}]: the id '{checked.id}' is used twice", param=f"guardrails[{i}]")
        ids.add(checked.id)
    Guardrails(rule_from_dict(r) for r in rules)  # compiles every pattern, as a request would


def public_rule(rule: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in rule.items() if k not in ("terms", "pattern")}
    return {**shown, "terms_count": len(rule.get("terms") or []), "has_pattern": bool(rule.get("pattern"))}


LIMITS = ("rpm", "tpm", "max_concurrent")  # what `set_limits` may change on a key


def _check_scopes(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise InvalidRequest(f"scopes must be a non-empty list of {', '.join(sorted(SCOPES))}", param="scopes")
    return sorted(set(scopes))


def _check_limit(value: int | None, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequest(f"{name} must be a positive integer or null", param=name)
    return value


def _check_noise(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100):
        raise InvalidRequest("noise_rho must be a number between 0 and 100, or null", param="noise_rho")
    return None if value is None else float(value)


class PolicyService:
    """Keys and guardrails as the edge and the admin API use them."""

    def __init__(self, store: Store):
        self.store = store
        self._compiled: tuple[int, Guardrails] | None = None

    # --- reading -----------------------------------------------------------------------------
    def _key(self, payload: dict, key_id: str) -> apikeys.KeyRecord:
        data = payload["keys"].get(key_id)
        if data is None:
            raise NotFound(f"no key with id '{key_id}'", code="key_not_found")
        return apikeys.from_dict(data)

    def list_keys(self) -> list[dict[str, Any]]:
        _, payload = self.store.current()
        return [apikeys.from_dict(k).public() for k in payload["keys"].values()]

    def has_key(self, key_id: str) -> bool:
        return key_id in self.store.current()[1]["keys"]

    def get_key(self, key_id: str) -> dict[str, Any]:
        return self._key(self.store.current()[1], key_id).public()

    def guardrails(self) -> Guardrails:
        version, payload = self.store.current()
        if self._compiled is None or self._compiled[0] != version:
            self._compiled = (version, Guardrails(_stored_rule(r) for r in payload["guardrails"]))
        return self._compiled[1]

    def list_guardrails(self) -> list[dict[str, Any]]:
        """The rules as an operator may see them back: a count of terms and whether there is a pattern, never
        the terms or the pattern themselves (they are often the very values the rule keeps out)."""
        return [public_rule(r) for r in self.store.current()[1]["guardrails"]]

    def authenticate(self, presented: str) -> Principal:
        """The principal of an API key; 401 with a reason (never the key) otherwise."""
        _, payload = self.store.current()
        data = payload["keys"].get(apikeys.key_id_of(presented))
        record = apikeys.from_dict(data) if data is not None else None
        if record is None or not apikeys.matches(record, presented):
            raise AuthenticationFailed("invalid API key", code="invalid_api_key")
        if record.revoked_at is not None:
            raise AuthenticationFailed("this API key has been revoked", code="revoked_api_key")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise AuthenticationFailed("this API key has expired", code="expired_api_key")
        return Principal(record.id, frozenset(record.scopes), record.rpm, record.tpm, kind="api_key",
                         noise_rho=record.noise_rho, max_concurrent=record.max_concurrent)

    # --- writing -----------------------------------------------------------------------------
    def ensure_bootstrap(self, admin_key: str) -> str | None:
        """Make sure an admin can get in: store VEIL_ADMIN_KEY's hash, or mint a key to print once."""
        _, payload = self.store.current()
        has_admin = any(Scope.ADMIN.value in k["scopes"] and k.get("revoked_at") is None
                        for k in payload["keys"].values())
        if admin_key:
            if len(admin_key) < 24:
                raise InvalidRequest("VEIL_ADMIN_KEY must be at least 24 characters")
            key_id = apikeys.key_id_of(admin_key)
            record = payload["keys"].get(key_id)
            if record is not None and apikeys.matches(apikeys.from_dict(record), admin_key):
                return None
            if key_id != apikeys.BOOTSTRAP_ID and record is not None:
                raise InvalidRequest("VEIL_ADMIN_KEY claims a key id that belongs to another key")
            self._put(apikeys.KeyRecord(key_id, "bootstrap admin", apikeys.hash_key(admin_key), [Scope.ADMIN.value]))
            return None
        if has_admin:
            return None
        key_id = apikeys.new_key_id()
        secret = apikeys.new_secret(key_id)
        self._put(apikeys.KeyRecord(key_id, "bootstrap admin", apikeys.hash_key(secret), [Scope.ADMIN.value]))
        return secret

    def _put(self, record: apikeys.KeyRecord) -> None:
        self.store.update(lambda p: p["keys"].__setitem__(record.id, dataclasses.asdict(record)))

    def create_key(self, name: str, scopes: list[str], rpm: int | None = None, tpm: int | None = None,
                   expires_at: float | None = None, noise_rho: float | None = None,
                   max_concurrent: int | None = None) -> tuple[dict[str, Any], str]:
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise InvalidRequest("name must be 1-100 characters", param="name")
        if expires_at is not None and (not isinstance(expires_at, (int, float)) or expires_at <= time.time()):
            raise InvalidRequest("expires_at must be a future unix time", param="expires_at")
        key_id = apikeys.new_key_id()
        secret = apikeys.new_secret(key_id)
        record = apikeys.KeyRecord(key_id, name, apikeys.hash_key(secret), _check_scopes(scopes),
                                   _check_limit(rpm, "rpm"), _check_limit(tpm, "tpm"), expires_at=expires_at,
                                   noise_rho=_check_noise(noise_rho),
                                   max_concurrent=_check_limit(max_concurrent, "max_concurrent"))
        self._put(record)
        return record.public(), secret

    def _edit(self, key_id: str, change: Callable[[apikeys.KeyRecord], T]) -> T:
        def mutate(payload: dict) -> T:
            record = self._key(payload, key_id)
            result = change(record)
            payload["keys"][key_id] = dataclasses.asdict(record)
            return result
        return self.store.update(mutate)

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        def change(r: apikeys.KeyRecord) -> dict[str, Any]:
            r.revoked_at = r.revoked_at or time.time()
            return r.public()
        return self._edit(key_id, change)

    def rotate_key(self, key_id: str) -> tuple[dict[str, Any], str]:
        if key_id == apikeys.BOOTSTRAP_ID:
            raise InvalidRequest("the bootstrap key comes from VEIL_ADMIN_KEY; change it there")
        secret = apikeys.new_secret(key_id)

        def change(r: apikeys.KeyRecord) -> dict[str, Any]:
            if r.revoked_at is not None:
                raise InvalidRequest("a revoked key cannot be rotated; create a new one")
            r.hash = apikeys.hash_key(secret)
            return r.public()
        return self._edit(key_id, change), secret

    def set_limits(self, key_id: str, changes: dict[str, int | None]) -> dict[str, Any]:
        """Change only the limits named in `changes` (a None value clears that limit); the others stay."""
        unknown = sorted(set(changes) - set(LIMITS))
        if unknown or not changes:
            raise InvalidRequest("give any of 'rpm', 'tpm', 'max_concurrent' (null clears a limit)",
                                 param=unknown[0] if unknown else None)
        for name, value in changes.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidRequest(f"'{name}' must be an integer or null", param=name)
            _check_limit(value, name)

        def change(r: apikeys.KeyRecord) -> dict[str, Any]:
            for name, value in changes.items():
                setattr(r, name, value)
            return r.public()
        return self._edit(key_id, change)

    def set_noise(self, key_id: str, noise_rho: float | None) -> dict[str, Any]:
        """A key's embedding noise; None returns it to the deployment's default."""
        value = _check_noise(noise_rho)

        def change(r: apikeys.KeyRecord) -> dict[str, Any]:
            r.noise_rho = value
            return r.public()
        return self._edit(key_id, change)

    def add_guardrail(self, data: dict[str, Any]) -> dict[str, Any]:
        rule = rule_from_dict(data)

        def mutate(payload: dict) -> dict[str, Any]:
            if any(r["id"] == rule.id for r in payload["guardrails"]):
                raise InvalidRequest(f"a guardrail with id '{rule.id}' exists", param="id")
            payload["guardrails"].append(dataclasses.asdict(rule))
            return public_rule(dataclasses.asdict(rule))
        return self.store.update(mutate)

    def import_policy(self, data: Any) -> int:
        """Replace the policy with an export, once every key and rule in it checks out (400 otherwise): a bad
        record let in here would fail every later request."""
        payload = data.get("payload") if isinstance(data, dict) else None
        if not isinstance(payload, dict):
            raise InvalidRequest('a policy import needs {"payload": ...} holding keys, guardrails and settings')
        check_payload(payload)
        return self.store.import_plain(data)

    def remove_guardrail(self, rule_id: str) -> None:
        def mutate(payload: dict) -> None:
            kept = [r for r in payload["guardrails"] if r["id"] != rule_id]
            if len(kept) == len(payload["guardrails"]):
                raise NotFound(f"no guardrail with id '{rule_id}'", code="guardrail_not_found")
            payload["guardrails"] = kept
        self.store.update(mutate)

    def console_check(self, key_id: str) -> str | None:
        """For a console session: a fingerprint of the key's stored hash while the key is usable and holds the admin
        scope, else None. Rotating the key changes it, so a session opened with the old secret ends; the hash
        itself never leaves this class."""
        data = self.store.current()[1]["keys"].get(key_id)
        record = apikeys.from_dict(data) if data is not None else None
        if record is None or not record.usable(time.time()) or Scope.ADMIN.value not in record.scopes:
            return None
        return hashlib.sha256(b"veil-console:" + record.hash.encode()).hexdigest()[:32]
