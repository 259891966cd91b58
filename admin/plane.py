"""Assemble the policy plane from settings: store, policy service, authenticator, limiter, audit."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from pathlib import Path

from admin.audit import AuditLog
from admin.auth import Authenticator
from admin.console.sessions import ConsoleSessions, MemoryConsoleSessions, RedisConsoleSessions
from admin.policy import MemoryStore, PolicyService
from admin.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from admin.usage import MemoryUsageStore, RedisUsageStore, SqliteUsageStore, UsageLedger, UsageStore
from veil.errors import ConfigError
from veil.settings import Settings

log = logging.getLogger("veil.admin")


@dataclasses.dataclass
class PolicyPlane:
    auth: Authenticator
    policy: PolicyService
    limiter: RateLimiter
    audit: AuditLog | None
    bootstrap_secret: str | None  # a freshly minted admin key, to print once; never logged
    usage: UsageLedger = dataclasses.field(default_factory=lambda: UsageLedger(MemoryUsageStore()))
    console: ConsoleSessions = dataclasses.field(default_factory=MemoryConsoleSessions)  # the console's sign-ins

    async def aclose(self) -> None:
        await self.usage.aclose()  # the last counts reach the store
        await self.console.aclose()
        await self.limiter.aclose()
        if self.auth.jwt is not None:
            await self.auth.jwt.aclose()  # type: ignore[attr-defined]
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)  # the last queued lines reach the disk
        close = getattr(self.policy.store, "close", None)
        if close is not None:
            close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _jwt(settings: Settings):
    a = settings.auth
    if not (a.jwt_jwks_url or a.jwt_public_key_file):
        return None
    from admin.jwt_auth import JwtSettings, JwtVerifier

    if not (a.jwt_issuer and a.jwt_audience):
        raise ConfigError("JWT auth needs auth.jwt_issuer and auth.jwt_audience")
    pem = Path(a.jwt_public_key_file).read_text() if a.jwt_public_key_file else ""
    return JwtVerifier(JwtSettings(issuer=a.jwt_issuer, audience=a.jwt_audience, jwks_url=a.jwt_jwks_url,
                                   public_key_pem=pem, default_rpm=a.jwt_default_rpm or None,
                                   default_tpm=a.jwt_default_tpm or None))


def usage_store(settings: Settings) -> UsageStore:
    """Where usage counts live, by the policy store's rules: Redis when configured, else a file beside the
    encrypted store, else (one local user, no store) memory."""
    if settings.redis.url:
        return RedisUsageStore(settings.redis.url)
    if settings.policy.passphrase:
        store = settings.policy_store_path()
        return SqliteUsageStore(store.with_name(store.stem + ".usage.sqlite"))
    return MemoryUsageStore()


def console_sessions(settings: Settings) -> ConsoleSessions:
    """Redis when configured, so that edge replicas behind one load balancer share the console's sign-ins."""
    return RedisConsoleSessions(settings.redis.url) if settings.redis.url else MemoryConsoleSessions()


def build_plane(settings: Settings) -> PolicyPlane:
    """Auth on needs the encrypted store; auth off (one local user) may run on an in-process one."""
    if not settings.auth.enabled and not is_loopback(settings.edge.host) \
            and not settings.auth.allow_unauthenticated_public:
        raise ConfigError(f"refusing to serve without authentication on {settings.edge.host}: set "
                          "VEIL_AUTH_ENABLED=true (or auth.allow_unauthenticated_public to force it)")
    audit: AuditLog | None
    if settings.policy.passphrase:
        from admin.policy_setup import open_policy

        # refuses a missing store with traces of an earlier one, and a tampered, cut or rolled-back store or log
        store, audit = open_policy(settings)
    elif settings.auth.enabled:
        raise ConfigError("auth is enabled but VEIL_POLICY_PASSPHRASE is not set: the policy store "
                          "(keys, limits, guardrails) must be encrypted")
    else:
        store, audit = MemoryStore(), None  # type: ignore[assignment]
    policy = PolicyService(store)
    bootstrap = policy.ensure_bootstrap(settings.auth.admin_key) if settings.auth.enabled else None
    if bootstrap and audit is not None:
        audit.record("key.bootstrap", actor="system")
    limiter: RateLimiter = (RedisRateLimiter(settings.redis.url, fail_open=settings.redis.fail_open)
                            if settings.redis.url else MemoryRateLimiter())
    return PolicyPlane(Authenticator(settings.auth.enabled, policy, _jwt(settings)), policy, limiter, audit,
                       bootstrap, UsageLedger(usage_store(settings)), console_sessions(settings))
