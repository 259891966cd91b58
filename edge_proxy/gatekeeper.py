"""The policy stages of a request at the edge: auth -> scope -> admission -> guardrails -> span protection ->
token reservation.

Admission is the cheap part that runs before the body is read: the request counts toward the key's rpm
(so malformed, over-context and refused requests count too) and takes one of this edge's core sessions
(edge_proxy/admission.py). Once the prompt is tokenized, `reserve` adds its worst-case tokens against tpm;
`release` settles them to the real usage and frees the session, once, however the request ends.

Output rules run inside the reply's text pipeline (edge_proxy/reply_text.py); their blocks are
recorded here once the request ends.

Every rejection is counted (by key id or reason, never by secret), written to the audit log and added to the
key's usage (admin/usage.py), as are the tokens of every request that ran and the spans protected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from admin.auth import require
from admin.guardrails import Guardrails, OutputGate
from admin.plane import PolicyPlane
from admin.principal import Principal, Scope
from admin.ratelimit import RateDecision, rate_limit_headers
from edge_proxy.admission import SessionShare
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.spans.detect import SpanDetector
from edge_proxy.spans.protect import ProtectedPrompt, protect
from veil.errors import AuthenticationFailed, PermissionDenied, PolicyViolation, RateLimited, ServiceUnavailable


@dataclasses.dataclass(slots=True)
class Admission:
    """One request's hold on its key's limits: a counted request (the limiter's entry) and a core session."""

    principal: Principal
    entry: str
    decision: RateDecision  # the latest decision: its x-ratelimit-* headers go on the response
    released: bool = False


class Gatekeeper:
    def __init__(self, plane: PolicyPlane, metrics: EdgeMetrics, sessions: SessionShare, ner_model: str = ""):
        self.plane, self.metrics, self.sessions, self.ner_model = plane, metrics, sessions, ner_model
        self._detector: tuple[Guardrails, SpanDetector] | None = None
        metrics.sessions_held.set_function(lambda: sessions.total)
        metrics.sessions_waiting.set_function(lambda: sessions.waiting)

    def detector(self) -> SpanDetector:
        """The protect rules of the current policy version, compiled once per version."""
        rails = self.plane.policy.guardrails()
        if self._detector is None or self._detector[0] is not rails:
            detector = SpanDetector(rails.protect_rules, self.ner_model)
            detector.warm()
            self._detector = (rails, detector)
        return self._detector[1]

    def _audit(self, event: str, **fields: Any) -> None:
        if self.plane.audit is not None:
            self.plane.audit.record(event, **fields)

    async def principal(self, headers: Any, scope: Scope, rid: str, path: str) -> Principal:
        """Authenticate and check the scope (401, then 403)."""
        try:
            principal = await self.plane.auth.authenticate(headers)
        except AuthenticationFailed as exc:
            self.metrics.auth_failures.labels(reason=str(exc.code)).inc()
            self.plane.usage.count(self.plane.auth.claimed(headers), refused_401=1)
            self._audit("auth.failure", request_id=rid, reason=str(exc.code), path=path)
            exc.headers["www-authenticate"] = "Bearer"
            raise
        try:
            require(principal, scope)
        except PermissionDenied:
            self.metrics.permission_denied.labels(scope=scope.value).inc()
            self.plane.usage.count(principal.key_id, refused_403=1)
            self._audit("auth.denied", actor=principal.key_id, request_id=rid, scope=scope.value, path=path)
            raise
        return principal

    async def admit(self, principal: Principal, rid: str) -> Admission:
        """Count the request against rpm, then hold a core session for it (429 over a limit, 503 when every
        session stays busy). Runs before the body is read, so it is cheap whatever the client sends."""
        decision = await self.plane.limiter.acquire(principal.key_id, rpm=principal.rpm, tpm=principal.tpm, tokens=0)
        if not decision.allowed:
            self._refuse(principal, rid, decision, "requests" if decision.remaining_requests == 0 else "tokens")
        try:
            await self.sessions.take(principal.key_id, principal.max_concurrent)
        except RateLimited:
            self.metrics.rate_limited.labels(limit="concurrency").inc()
            self.plane.usage.count(principal.key_id, refused_429=1)
            self._audit("ratelimit.reject", actor=principal.key_id, request_id=rid, limit="concurrency")
            raise
        except ServiceUnavailable:
            self.metrics.sessions_busy.inc()
            raise
        return Admission(principal, decision.entry, decision)

    async def reserve(self, admission: Admission, tokens: int, rid: str) -> None:
        """Add the request's worst-case tokens (prompt + max new) to its entry, against tpm (429 if over)."""
        p = admission.principal
        decision = await self.plane.limiter.reserve(p.key_id, entry=admission.entry, rpm=p.rpm, tpm=p.tpm,
                                                    tokens=tokens)
        if not decision.allowed:
            self._refuse(p, rid, decision, "tokens")
        admission.decision = decision

    async def release(self, admission: Admission, tokens: int) -> None:
        """Free the session and correct the entry to the tokens really used; only the first call counts."""
        if admission.released:
            return
        admission.released = True
        self.sessions.give(admission.principal.key_id)
        await self.plane.limiter.settle(admission.principal.key_id, entry=admission.entry, actual_tokens=tokens)

    def _refuse(self, principal: Principal, rid: str, decision: RateDecision, which: str) -> None:
        self.metrics.rate_limited.labels(limit=which).inc()
        self.plane.usage.count(principal.key_id, refused_429=1)
        self._audit("ratelimit.reject", actor=principal.key_id, request_id=rid, limit=which)
        raise RateLimited(f"rate limit reached for {which} per minute on key {principal.key_id}; "
                          f"retry after {decision.retry_after_s:.1f}s", code="rate_limit_exceeded",
                          headers=rate_limit_headers(decision))

    def output_gate(self) -> OutputGate | None:
        """The output rules of the current policy, for one reply's text pipeline (None if there are none)."""
        return self.plane.policy.guardrails().output_gate()

    def blocked(self, principal: Principal, rule_id: str, rid: str, where: str) -> None:
        """Count and audit a guardrail block (prompt or output) by key id and rule id."""
        self.metrics.policy_blocks.labels(rule=rule_id).inc()
        self.plane.usage.count(principal.key_id, refused_policy=1)
        self._audit("policy.block", actor=principal.key_id, request_id=rid, rule_id=rule_id, where=where)

    def guard_prompt(self, principal: Principal, messages: list[dict[str, str]],
                     rid: str) -> list[dict[str, str]] | None:
        """Block (400) or redact before anything reaches the core; the redacted messages, or None if untouched."""
        try:
            redacted, fired = self.plane.policy.guardrails().check_prompt(messages)
        except PolicyViolation as exc:
            self.blocked(principal, exc.rule_id, rid, "prompt")
            raise
        if not fired:
            return None
        self._audit("policy.redact", actor=principal.key_id, request_id=rid, rules=",".join(fired))
        return redacted

    def protect_prompt(self, principal: Principal, messages: list[dict[str, str]], rid: str) -> ProtectedPrompt | None:
        """Spans the protect rules find, replaced by placeholders or marked for noise; None if none found.
        Counted by type and audited by rule id; the values and the mapping never leave this object."""
        detector = self.detector()
        if not detector.active:
            return None
        protected = protect(detector, messages)
        if not protected.changed:
            return None
        for _, span in protected.spans:
            self.metrics.protected_spans.labels(label=span.label, protection=span.protection).inc()
        self.plane.usage.count(principal.key_id, protected_spans=len(protected.spans))
        rules = sorted({span.rule_id for _, span in protected.spans})
        self._audit("policy.protect", actor=principal.key_id, request_id=rid, rules=",".join(rules),
                    spans=len(protected.spans))
        return protected
