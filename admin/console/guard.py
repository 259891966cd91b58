"""Who may use the console, checked on every request: host, origin, session, CSRF token.

A session is only as good as the key behind it: each request re-reads the key record, so revoking,
rotating, expiring or un-scoping the key ends its sessions at once, on every replica.
"""

from __future__ import annotations

import dataclasses
import hmac
from typing import Any, Awaitable, Callable, Protocol
from urllib.parse import urlsplit

from litestar import Request
from litestar.datastructures import Cookie, FormMultiDict

from admin.audit import AuditLog
from admin.auth import Authenticator
from admin.console.sessions import ConsoleSession, ConsoleSessions
from admin.plane import is_loopback
from admin.policy import PolicyService
from admin.usage import UsageLedger
from veil.errors import AuthenticationFailed, PermissionDenied

SESSION_COOKIE = "veil_console"
LOGIN_COOKIE = "veil_console_login"  # the sign-in form's token, before there is a session
LOCAL_FINGERPRINT = "local-user"  # auth off: no key record to fingerprint


class ConsoleState(Protocol):
    """What the console reads off the edge's app state."""

    auth: Authenticator
    policy: PolicyService
    audit: AuditLog | None
    usage: UsageLedger
    console: ConsoleSessions
    core_health: Callable[[], Awaitable[dict[str, Any]]]


class SignInRequired(AuthenticationFailed):
    """No live session: pages send the browser to sign in, changes are refused with 401."""

    code = "console_sign_in_required"


@dataclasses.dataclass(frozen=True, slots=True)
class Operator:
    """The signed-in operator of this request."""

    sid: str
    session: ConsoleSession

    @property
    def key_id(self) -> str:
        return self.session.key_id

    @property
    def csrf(self) -> str:
        return self.session.csrf


def state_of(request: Request) -> ConsoleState:
    return request.app.state  # the edge puts these on its state (edge_proxy/app.py)


def same_secret(given: Any, expected: str) -> bool:
    return isinstance(given, str) and bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def check_host(request: Request) -> None:
    """Auth off, the console trusts whoever reaches loopback; a page from another name that resolves to us
    (DNS rebinding) must not ride on that."""
    if not state_of(request).auth.enabled and not is_loopback(_host_name(request.headers.get("host", ""))):
        raise PermissionDenied("with authentication off the console answers on a loopback address only",
                               code="console_host_refused")


def check_origin(request: Request) -> None:
    """A change must come from our own pages. The host is compared, not the scheme: a TLS-terminating proxy
    hands us http while the browser says https; another site differs in its host."""
    if request.headers.get("sec-fetch-site", "") == "cross-site":
        raise PermissionDenied("a cross-site form was refused", code="console_cross_site")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        raise PermissionDenied("a form from another origin was refused", code="console_cross_site")


def _still_admin(state: ConsoleState, session: ConsoleSession) -> bool:
    if not state.auth.enabled:
        return session.kind == "local"
    fingerprint = state.policy.console_check(session.key_id) if session.kind == "api_key" else None
    return fingerprint is not None and same_secret(fingerprint, session.fingerprint)


async def operator(request: Request) -> Operator:
    """The signed-in operator, or SignInRequired (a session that outlived its key is ended here)."""
    check_host(request)
    state = state_of(request)
    sid = request.cookies.get(SESSION_COOKIE)
    session = await state.console.get(sid) if sid else None
    if sid is None or session is None:
        raise SignInRequired("sign in to use the console")
    if not _still_admin(state, session):
        await state.console.end(sid)
        raise SignInRequired("the key of this session was revoked, rotated or lost its admin scope; sign in again")
    return Operator(sid, session)


async def change(request: Request) -> tuple[Operator, FormMultiDict]:
    """A form that changes something: our origin, a live session and the session's CSRF token."""
    check_origin(request)
    me = await operator(request)
    form = await request.form()
    if not same_secret(form.get("csrf_token"), me.csrf):
        raise PermissionDenied("the form's CSRF token is missing or wrong; reload the page and try again",
                               code="console_csrf")
    return me, form


def cookie(request: Request, name: str, value: str, *, expire: bool = False) -> Cookie:
    """A cookie for the console's path only, out of scripts' reach, never sent along from another site;
    `expire` makes the browser drop it."""
    return Cookie(key=name, value=value, path="/admin", httponly=True, samesite="strict",
                  secure=request.url.scheme == "https", max_age=0 if expire else None)
