"""Who is calling: bearer API keys or JWTs -> Principal, and scope guards.

A missing or wrong credential is 401; a valid one lacking the scope is 403.
"""

from __future__ import annotations

from typing import Any, Protocol

from admin import keys as apikeys
from admin.policy import PolicyService
from admin.principal import Principal, Scope
from admin.usage import UNKNOWN
from veil.errors import AuthenticationFailed, PermissionDenied

LOCAL = Principal("local", frozenset(s.value for s in Scope), kind="local")


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Principal: ...


def bearer_token(headers: Any) -> str | None:
    """The credential of `Authorization: Bearer …` (what the openai client sends), or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("the Authorization header must be 'Bearer <API key>'", code="invalid_api_key")
    return token.strip()


class Authenticator:
    """Auth off: every caller is the local user. Auth on: an API key, or a JWT when configured."""

    def __init__(self, enabled: bool, policy: PolicyService, jwt: TokenVerifier | None = None):
        self.enabled, self.policy, self.jwt = enabled, policy, jwt

    async def authenticate(self, headers: Any) -> Principal:
        if not self.enabled:
            return LOCAL
        token = bearer_token(headers)
        if token is None:
            raise AuthenticationFailed("no API key was provided: send 'Authorization: Bearer <API key>'",
                                       code="missing_api_key")
        if self.jwt is not None and token.count(".") == 2 and not token.startswith("sk-"):
            return await self.jwt.verify(token)
        return self.policy.authenticate(token)

    def claimed(self, headers: Any) -> str:
        """Whose usage a refused credential counts against: the key it names when that key exists here (a revoked
        key still in use, a wrong secret for a real id), else 'unknown': a JWT is unverified at this point, and a
        made-up id must not create usage rows."""
        try:
            token = bearer_token(headers)
        except AuthenticationFailed:
            return UNKNOWN
        if token is None or not token.startswith(apikeys.PREFIX):
            return UNKNOWN
        key_id = apikeys.key_id_of(token)
        return key_id if self.policy.has_key(key_id) else UNKNOWN


def require(principal: Principal, scope: Scope) -> None:
    if not principal.has(scope):
        raise PermissionDenied(f"this credential lacks the '{scope.value}' scope", code="insufficient_scope")
