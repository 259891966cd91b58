"""Who is calling, once authenticated: the value every later stage (scopes, limits, audit) reads."""

from __future__ import annotations

import dataclasses
import enum


class Scope(str, enum.Enum):
    GENERATE = "generate"  # chat completions
    READ = "read"  # models, own usage
    ADMIN = "admin"  # the admin API; implies read and metrics
    METRICS = "metrics"  # the edge's Prometheus /metrics (a scraper's key)


IMPLIED_BY_ADMIN = frozenset({Scope.READ.value, Scope.METRICS.value})  # not generate: an admin key is no model user


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `key_id` is safe to log and to label metrics with; no secret is held."""

    key_id: str  # API key id, "jwt:<subject>", or "local" when auth is off
    scopes: frozenset[str]
    rpm: int | None = None  # requests per minute; None = unlimited
    tpm: int | None = None  # tokens per minute; None = unlimited
    kind: str = "api_key"  # api_key | jwt | local
    noise_rho: float | None = None  # per-key embedding noise; None = the deployment's setting
    max_concurrent: int | None = None  # concurrent generations; None = the deployment's setting

    def has(self, scope: Scope) -> bool:
        return scope.value in self.scopes or (Scope.ADMIN.value in self.scopes and scope.value in IMPLIED_BY_ADMIN)
