"""The admin REST API (`/admin/v1/...`, scope `admin`) and `/v1/me` (scope `read`).

Every change is written to the audit log with who made it; no response carries a key hash,
and a new secret is returned once, by the call that created it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol

import anyio
from litestar import Request, Router, delete, get, patch, post
from litestar.params import Parameter

from admin.audit import AuditLog
from admin.auth import Authenticator, require
from admin.policy import LIMITS, PolicyService
from admin.principal import Principal, Scope
from admin.usage import UsageLedger, parse_since, totals
from veil.errors import AuthenticationFailed, InvalidRequest, PermissionDenied, ServiceUnavailable
from veil.openapi import AUTHENTICATED, WITH_BODY, WITH_PATH, documented


class AdminState(Protocol):
    auth: Authenticator
    policy: PolicyService
    audit: AuditLog | None
    usage: UsageLedger


_BAD_QUERY = {400: "an invalid query parameter"}


@dataclasses.dataclass
class KeyCreate:
    name: str
    scopes: list[str]
    rpm: int | None = None
    tpm: int | None = None
    expires_at: float | None = None  # unix time; or
    expires_in_s: int | None = None  # seconds from now
    noise_rho: float | None = None  # embedding noise for this key (privacy defense); null = deployment default
    max_concurrent: int | None = None  # concurrent generations; null = the deployment's edge.max_concurrent_per_key


@dataclasses.dataclass
class NoiseChange:
    noise_rho: float | None  # null = the deployment's default


@dataclasses.dataclass
class GuardrailCreate:
    id: str
    action: str
    pattern: str = ""
    terms: list[str] = dataclasses.field(default_factory=list)
    applies_to: list[str] = dataclasses.field(default_factory=lambda: ["prompt"])
    description: str = ""
    entities: list[str] = dataclasses.field(default_factory=list)
    label: str = ""
    protection: str = "placeholder"


def _rid(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


async def _caller(request: Request, scope: Scope) -> Principal:
    """Authenticate and check the scope; refusals are audited like the edge's (401 auth.failure, 403 auth.denied)."""
    state: AdminState = request.app.state
    try:
        principal = await state.auth.authenticate(request.headers)
    except AuthenticationFailed as exc:
        state.usage.count(state.auth.claimed(request.headers), refused_401=1)
        if state.audit is not None:
            state.audit.record("auth.failure", request_id=_rid(request), reason=str(exc.code), path=request.url.path)
        raise
    try:
        require(principal, scope)
    except PermissionDenied:
        state.usage.count(principal.key_id, refused_403=1)
        _audit(request, "auth.denied", principal, scope=scope.value, path=request.url.path)
        raise
    return principal


def audit_event(request: Request, event: str, actor: str | None, **fields: Any) -> None:
    """One audit line for a change or refusal made through the admin API or the console (no log: nothing)."""
    audit = request.app.state.audit
    if audit is not None:
        audit.record(event, actor=actor, request_id=_rid(request), **fields)


def _audit(request: Request, event: str, actor: Principal, **fields: Any) -> None:
    audit_event(request, event, actor.key_id, **fields)


@post("/keys", status_code=201, operation_class=documented(AUTHENTICATED, WITH_BODY),
      summary="Create an API key; the secret is shown once")
async def create_key(request: Request, data: KeyCreate) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    expires_at = data.expires_at
    if data.expires_in_s is not None:
        if data.expires_in_s < 1:
            raise InvalidRequest("expires_in_s must be positive", param="expires_in_s")
        expires_at = time.time() + data.expires_in_s
    record, secret = request.app.state.policy.create_key(data.name, data.scopes, data.rpm, data.tpm, expires_at,
                                                         data.noise_rho, data.max_concurrent)
    _audit(request, "key.create", who, key_id=record["id"], scopes=",".join(record["scopes"]))
    return {"key": record, "secret": secret}


@get("/keys", operation_class=documented(AUTHENTICATED), summary="List API keys (no secrets, no hashes)")
async def list_keys(request: Request) -> dict[str, Any]:
    await _caller(request, Scope.ADMIN)
    return {"object": "list", "data": request.app.state.policy.list_keys()}


@get("/keys/{key_id:str}", operation_class=documented(AUTHENTICATED, WITH_PATH), summary="Show one API key")
async def get_key(request: Request, key_id: str) -> dict[str, Any]:
    await _caller(request, Scope.ADMIN)
    return request.app.state.policy.get_key(key_id)


@post("/keys/{key_id:str}/revoke", operation_class=documented(AUTHENTICATED, WITH_PATH), status_code=200,
      summary="Revoke a key at once, on every replica")
async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    record = request.app.state.policy.revoke_key(key_id)
    _audit(request, "key.revoke", who, key_id=key_id)
    return record


@post("/keys/{key_id:str}/rotate", operation_class=documented(AUTHENTICATED, WITH_PATH), status_code=200,
      summary="Replace a key's secret; the old one stops working")
async def rotate_key(request: Request, key_id: str) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    record, secret = request.app.state.policy.rotate_key(key_id)
    _audit(request, "key.rotate", who, key_id=key_id)
    return {"key": record, "secret": secret}


@patch("/keys/{key_id:str}/limits", operation_class=documented(AUTHENTICATED, WITH_BODY, WITH_PATH),
       summary="Change a key's rpm, tpm and/or max_concurrent; a limit left out stays, null = unlimited")
async def set_limits(request: Request, key_id: str, data: dict[str, Any]) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    record = request.app.state.policy.set_limits(key_id, data)
    _audit(request, "key.limits", who, key_id=key_id, **{k: data[k] for k in LIMITS if k in data})
    return record


@patch("/keys/{key_id:str}/noise", operation_class=documented(AUTHENTICATED, WITH_BODY, WITH_PATH),
       summary="Change a key's embedding noise (noise_rho); null = the deployment's default")
async def set_noise(request: Request, key_id: str, data: NoiseChange) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    record = request.app.state.policy.set_noise(key_id, data.noise_rho)
    _audit(request, "key.noise", who, key_id=key_id, noise_rho=data.noise_rho)
    return record


@get("/guardrails", operation_class=documented(AUTHENTICATED),
     summary="List guardrail rules (their terms and patterns are never shown back)")
async def list_guardrails(request: Request) -> dict[str, Any]:
    await _caller(request, Scope.ADMIN)
    return {"object": "list", "data": request.app.state.policy.list_guardrails()}


@post("/guardrails", operation_class=documented(AUTHENTICATED, WITH_BODY), status_code=201,
      summary="Add a guardrail rule (block, redact or protect; prompt and/or output)")
async def add_guardrail(request: Request, data: GuardrailCreate) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    rule = request.app.state.policy.add_guardrail(dataclasses.asdict(data))
    _audit(request, "guardrail.add", who, rule_id=rule["id"], action=rule["action"])
    return rule


@delete("/guardrails/{rule_id:str}", operation_class=documented(AUTHENTICATED, WITH_PATH), status_code=204,
        summary="Remove a guardrail rule")
async def remove_guardrail(request: Request, rule_id: str) -> None:
    who = await _caller(request, Scope.ADMIN)
    request.app.state.policy.remove_guardrail(rule_id)
    _audit(request, "guardrail.remove", who, rule_id=rule_id)


def _audit_log(request: Request) -> AuditLog:
    audit = request.app.state.audit
    if audit is None:
        raise ServiceUnavailable("no audit log is configured on this edge", code="audit_disabled")
    return audit


@get("/audit", operation_class=documented(AUTHENTICATED, _BAD_QUERY), summary="The last audit lines")
async def audit_tail(request: Request, n: int = Parameter(default=20, ge=1, le=1000)) -> dict[str, Any]:
    await _caller(request, Scope.ADMIN)
    # tail and verify flush the writer and read the file: off the event loop
    return {"object": "list", "data": await anyio.to_thread.run_sync(_audit_log(request).tail, n)}


@get("/audit/verify", operation_class=documented(AUTHENTICATED), summary="Check the audit log's hash chain")
async def audit_verify(request: Request) -> dict[str, Any]:
    await _caller(request, Scope.ADMIN)
    return dataclasses.asdict(await anyio.to_thread.run_sync(_audit_log(request).verify))


def _since(since: str | None) -> Any:
    return parse_since(since or "7d")


@get("/usage", operation_class=documented(AUTHENTICATED, _BAD_QUERY),
     summary="Usage per key and per UTC day: requests, tokens, refusals, protected spans")
async def usage(request: Request, key_id: str | None = None, since: str | None = None) -> dict[str, Any]:
    await _caller(request, Scope.ADMIN)
    first = _since(since)
    rows = await request.app.state.usage.rows(key_id, first)
    return {"object": "list", "since": first.isoformat(), "data": rows, "total": totals(rows)}


@get("/policy/export", operation_class=documented(AUTHENTICATED), summary="The whole policy (keys as hashes) for backup")
async def policy_export(request: Request) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    _audit(request, "policy.export", who)
    return request.app.state.policy.store.export_plain()


@post("/policy/import", operation_class=documented(AUTHENTICATED, WITH_BODY), status_code=200,
      summary="Replace the policy with an export; a new version")
async def policy_import(request: Request, data: dict[str, Any]) -> dict[str, Any]:
    who = await _caller(request, Scope.ADMIN)
    version = request.app.state.policy.import_policy(data)
    _audit(request, "policy.import", who, version=version)
    return {"version": version}


@get("/v1/me", operation_class=documented(AUTHENTICATED, _BAD_QUERY),
     summary="The calling key's id, scopes, limits and usage per UTC day (since: '7d' by default)")
async def whoami(request: Request, since: str | None = None) -> dict[str, Any]:
    who = await _caller(request, Scope.READ)
    first = _since(since)
    rows = await request.app.state.usage.rows(who.key_id, first)
    return {"key_id": who.key_id, "kind": who.kind, "scopes": sorted(who.scopes), "rpm": who.rpm, "tpm": who.tpm,
            "max_concurrent": who.max_concurrent, "noise_rho": who.noise_rho,
            "usage": {"since": first.isoformat(), "data": rows, "total": totals(rows)}}


admin_router = Router(
    path="/admin/v1",
    route_handlers=[create_key, list_keys, get_key, revoke_key, rotate_key, set_limits, set_noise, list_guardrails,
                    add_guardrail, remove_guardrail, audit_tail, audit_verify, usage, policy_export, policy_import],
    tags=["admin"],
)
me_route = whoami
