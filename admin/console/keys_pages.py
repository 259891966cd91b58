"""The keys pages: list and create, then per key its limits, noise, rotation and revocation.

A new secret is the direct answer to the POST that made it (never stored, never in a URL, never cached);
every change is audited with the same events as the REST API, the signed-in key as the actor.
"""

from __future__ import annotations

import time
from urllib.parse import quote

from litestar import Request, Response, get, post

from admin.api import audit_event as audit  # the REST API's lines, the same for a console change
from admin.console import forms
from admin.console.guard import Operator, change, operator, state_of
from admin.console.render import page, redirect
from admin.policy import LIMITS
from veil.errors import InvalidRequest

SCOPE_HINTS = [("generate", "chat and completions"), ("read", "models, own usage"),
               ("admin", "this console and the admin API"), ("metrics", "Prometheus /metrics")]
NOTICES = {"revoked": "The key was revoked.", "limits": "The limits were saved.",
           "noise": "The noise setting was saved."}
MAX_NOISE = 100.0
MAX_DAYS = 3650


def _keys_page(request: Request, me: Operator, status: int = 200, error: str | None = None) -> Response[str]:
    keys = sorted(state_of(request).policy.list_keys(), key=lambda k: k["created_at"], reverse=True)
    return page("keys.html", status, me=me, active="keys", keys=keys, scopes=SCOPE_HINTS, limits=None, error=error)


def _key_page(request: Request, me: Operator, key_id: str, status: int = 200, error: str | None = None,
              notice: str | None = None) -> Response[str]:
    key = state_of(request).policy.get_key(key_id)  # 404 for an unknown id
    return page("key.html", status, me=me, active="keys", key=key, error=error, notice=notice)


def _secret_page(me: Operator, heading: str, key: dict, secret: str, status: int) -> Response[str]:
    return page("secret.html", status, me=me, active="keys", heading=heading, key=key, secret=secret)


def _key_url(key_id: str, done: str) -> str:
    return f"/admin/keys/{quote(key_id, safe='')}?done={done}"


@get("/keys")
async def keys_list(request: Request) -> Response[str]:
    return _keys_page(request, await operator(request))


@post("/keys")
async def key_create(request: Request) -> Response[str]:
    me, form = await change(request)
    try:
        days = forms.whole(form, "expires_days", high=MAX_DAYS)
        record, secret = state_of(request).policy.create_key(
            forms.text(form, "name", max_len=100), forms.picks(form, "scopes", [s for s, _ in SCOPE_HINTS]),
            forms.whole(form, "rpm"), forms.whole(form, "tpm"),
            None if days is None else time.time() + days * 86400,
            forms.number(form, "noise_rho", high=MAX_NOISE), forms.whole(form, "max_concurrent"))
    except InvalidRequest as exc:
        return _keys_page(request, me, exc.status_code, exc.message)
    audit(request, "key.create", me.key_id, key_id=record["id"], scopes=",".join(record["scopes"]))
    return _secret_page(me, "Key created", record, secret, 201)


@get("/keys/{key_id:str}")
async def key_detail(request: Request, key_id: str) -> Response[str]:
    me = await operator(request)
    return _key_page(request, me, key_id, notice=NOTICES.get(request.query_params.get("done", "")))


@post("/keys/{key_id:str}/revoke")
async def key_revoke(request: Request, key_id: str) -> Response[str]:
    me, _ = await change(request)
    state_of(request).policy.revoke_key(key_id)
    audit(request, "key.revoke", me.key_id, key_id=key_id)
    return redirect(_key_url(key_id, "revoked"))


@post("/keys/{key_id:str}/rotate")
async def key_rotate(request: Request, key_id: str) -> Response[str]:
    me, _ = await change(request)
    try:
        record, secret = state_of(request).policy.rotate_key(key_id)
    except InvalidRequest as exc:
        return _key_page(request, me, key_id, exc.status_code, exc.message)
    audit(request, "key.rotate", me.key_id, key_id=key_id)
    return _secret_page(me, "Secret rotated", record, secret, 200)


@post("/keys/{key_id:str}/limits")
async def key_limits(request: Request, key_id: str) -> Response[str]:
    me, form = await change(request)
    try:
        # every limit as the form shows it: an empty field clears that limit
        limits = {name: forms.whole(form, name) for name in LIMITS}
        state_of(request).policy.set_limits(key_id, limits)
    except InvalidRequest as exc:
        return _key_page(request, me, key_id, exc.status_code, exc.message)
    audit(request, "key.limits", me.key_id, key_id=key_id, **limits)
    return redirect(_key_url(key_id, "limits"))


@post("/keys/{key_id:str}/noise")
async def key_noise(request: Request, key_id: str) -> Response[str]:
    me, form = await change(request)
    try:
        noise_rho = forms.number(form, "noise_rho", high=MAX_NOISE)
        state_of(request).policy.set_noise(key_id, noise_rho)
    except InvalidRequest as exc:
        return _key_page(request, me, key_id, exc.status_code, exc.message)
    audit(request, "key.noise", me.key_id, key_id=key_id, noise_rho=noise_rho)
    return redirect(_key_url(key_id, "noise"))
