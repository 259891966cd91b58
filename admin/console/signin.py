"""Signing in and out: an admin API key, checked once and forgotten, buys a server-side session."""

from __future__ import annotations

import secrets

from litestar import Request, Response, get, post

from admin.api import audit_event as audit  # the REST API's lines, the same for a console change
from admin.console import forms
from admin.console.guard import (
    LOCAL_FINGERPRINT,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SignInRequired,
    change,
    check_host,
    check_origin,
    cookie,
    operator,
    same_secret,
    state_of,
)
from admin.console.render import page, redirect
from admin.console.sessions import new_session
from admin.principal import Scope
from veil.errors import AuthenticationFailed


@get("/")
async def index(request: Request) -> Response[str]:
    try:
        await operator(request)
    except SignInRequired:
        return redirect("/admin/login")
    return redirect("/admin/keys")


def _login_page(request: Request, status: int = 200, error: str | None = None) -> Response[str]:
    token = secrets.token_urlsafe(32)
    return page("login.html", status, cookies=[cookie(request, LOGIN_COOKIE, token)], login_token=token,
                auth_enabled=state_of(request).auth.enabled, error=error)


@get("/login")
async def login_form(request: Request) -> Response[str]:
    try:
        await operator(request)
    except SignInRequired:
        return _login_page(request)
    return redirect("/admin/keys")


@post("/login")
async def login(request: Request) -> Response[str]:
    check_host(request)
    check_origin(request)
    form = await request.form()
    # No session yet, so the form's token is a double submit: it must equal the cookie sent with the form.
    # That cookie is SameSite=Strict and HttpOnly, and the origin was checked: another site can neither make
    # the browser send it nor read it to copy into its own form.
    if not same_secret(form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE, "")):
        return _login_page(request, 403, "The sign-in form expired or came from elsewhere; try again.")
    state = state_of(request)
    if not state.auth.enabled:
        return await _open(request, "local", "local", LOCAL_FINGERPRINT)
    key = forms.text(form, "api_key", max_len=500)
    if not key:
        return _login_page(request, 401, "Paste an admin API key.")
    headers = {"authorization": f"Bearer {key}"}
    try:
        who = await state.auth.authenticate(headers)
    except AuthenticationFailed as exc:
        state.usage.count(state.auth.claimed(headers), refused_401=1)
        audit(request, "auth.failure", None, reason=str(exc.code), path=request.url.path)
        return _login_page(request, 401, f"Sign-in refused: {exc.message}.")
    fingerprint = state.policy.console_check(who.key_id) if who.kind == "api_key" else None
    if fingerprint is None or not who.has(Scope.ADMIN):
        state.usage.count(who.key_id, refused_403=1)
        audit(request, "auth.denied", who.key_id, scope=Scope.ADMIN.value, path=request.url.path)
        why = ("this key lacks the admin scope" if who.kind == "api_key"
               else "only an admin API key opens a console session, not a JWT")
        return _login_page(request, 403, f"Sign-in refused: {why}.")
    return await _open(request, who.key_id, "api_key", fingerprint)


async def _open(request: Request, key_id: str, kind: str, fingerprint: str) -> Response[str]:
    state = state_of(request)
    if old := request.cookies.get(SESSION_COOKIE):
        await state.console.end(old)  # a new id at each sign-in: a session id planted earlier is worth nothing
    sid, session = new_session(key_id, kind, fingerprint)
    await state.console.put(sid, session)
    audit(request, "console.signin", key_id, kind=kind)
    return redirect("/admin/keys", cookies=[cookie(request, SESSION_COOKIE, sid),
                                            cookie(request, LOGIN_COOKIE, "", expire=True)])


@post("/logout")
async def logout(request: Request) -> Response[str]:
    me, _ = await change(request)
    await state_of(request).console.end(me.sid)
    audit(request, "console.signout", me.key_id)
    return redirect("/admin/login", cookies=[cookie(request, SESSION_COOKIE, "", expire=True)])
