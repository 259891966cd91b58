"""Veil's typed errors, rendered as OpenAI error JSON by one function.

VeilError (500 server_error)
├── ConfigError                 bad settings at start-up (never reaches HTTP)
├── InvalidRequest (400)        the request is malformed or out of range
│   ├── ContextLengthExceeded   prompt + max tokens exceed a named limit
│   └── PolicyViolation         a guardrail rule blocked the request (names the rule id only)
├── AuthenticationFailed (401)  missing or wrong credential
├── PermissionDenied (403)      valid credential without the needed scope
├── NotFound (404)              unknown model, route or session
├── Conflict (409)              step offset does not match the session
├── PayloadTooLarge (413)       body or session token limit exceeded
├── Unprocessable (422)         well-formed but unusable content
├── RateLimited (429)           a rate or capacity limit; retry later
├── BundleError                 a bundle is missing, tampered or mismatched
├── PolicyStoreError (503)      the policy store is missing, tampered, rolled back or locked
│   └── AuditLogError           the audit log is missing, cut, rewritten or cannot be written
├── ServiceUnavailable (503)    this server, or a service it needs (Redis, JWKS), is not ready
└── CoreError (502)             the edge could not get a step done by the core; messages are the edge's own
    ├── CoreUnavailable (503)   the core is unreachable or not ready
    │   ├── CoreBusy (503)      the core is at its session or queue limit; carries Retry-After
    │   └── BundleMismatch (503) the core serves another cloaked bundle than this edge holds
    ├── CoreTimeout (504)       the core did not answer in time
    ├── SessionLost (502)       the core no longer holds the session (the engine re-prefills)
    └── CoreProtocolError (502) the core answered with an unexpected status or a malformed frame
"""

from __future__ import annotations

from typing import Any


class VeilError(Exception):
    """Root of Veil's errors; the message is safe to show to a client."""

    status_code = 500
    error_type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def to_openai(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.code, self.param)


class ConfigError(VeilError):
    """Raised at start-up when settings are invalid."""

    code = "config_error"


class InvalidRequest(VeilError):
    """Raised when a request is malformed or a parameter is out of range."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """Raised when prompt plus requested tokens exceed the context or session limit."""

    code = "context_length_exceeded"


class PolicyViolation(InvalidRequest):
    """Raised when a guardrail blocks a request; the message names the rule, never the matched text."""

    code = "policy_violation"

    def __init__(self, rule_id: str):
        super().__init__(f"the request was blocked by guardrail rule '{rule_id}'", param="messages")
        self.rule_id = rule_id


class AuthenticationFailed(VeilError):
    """Raised when a credential is missing or wrong."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class FrameRejected(AuthenticationFailed):
    """A sealed frame that does not open under its session's keys: tampered, truncated, misdirected or forged."""

    code = "frame_rejected"

    def __init__(self, message: str = "the frame does not open under this session's keys"):
        super().__init__(message)


class PermissionDenied(VeilError):
    """Raised when a valid credential lacks the scope a route needs."""

    status_code = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class NotFound(VeilError):
    """Raised for an unknown model, route or session."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(VeilError):
    """Raised when a step's position offset does not match its session."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "offset_mismatch"


class FrameOutOfOrder(Conflict):
    """A sealed frame that opens but is not the next one: replayed or reordered; the session is unchanged."""

    code = "frame_out_of_order"

    def __init__(self, message: str = "the frame is not the next one: replayed or reordered"):
        super().__init__(message)


class PayloadTooLarge(VeilError):
    """Raised when a body, or a session's token count, exceeds its limit."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class Unprocessable(VeilError):
    """Raised for well-formed input that cannot be used."""

    status_code = 422
    error_type = "invalid_request_error"
    code = "unprocessable"


class RateLimited(VeilError):
    """Raised when a rate or capacity limit is reached; the client may retry."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BundleError(VeilError):
    """Raised when a bundle is missing, tampered with, or does not match its peer."""

    code = "bundle_error"


class PolicyStoreError(VeilError):
    """Raised when the encrypted policy store cannot be opened, verified or written (a 503 while serving)."""

    status_code = 503
    error_type = "server_error"
    code = "policy_store_error"


class AuditLogError(PolicyStoreError):
    """The audit log cannot be opened, verified or written (a start-up refusal; a 503 while serving)."""

    code = "audit_log_error"


class ServiceUnavailable(VeilError):
    """Raised when this server, or a service it needs (Redis, a JWKS), is not ready."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"


class CoreError(VeilError):
    """Raised by the edge's core transport when a step could not be done; never the client's fault."""

    status_code = 502
    error_type = "server_error"
    code = "core_error"


class CoreUnavailable(CoreError):
    """Raised when the core cannot be reached or is not ready."""

    status_code = 503
    code = "core_unavailable"


class CoreBusy(CoreUnavailable):
    """Raised when the core holds as many sessions or queued steps as it may; the client should retry shortly."""

    code = "core_busy"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, headers={"retry-after": str(retry_after_s)})


class BundleMismatch(CoreUnavailable):
    """Raised when the core serves another cloaked bundle than the one this edge's rotation belongs to."""

    code = "bundle_mismatch"

    def __init__(self) -> None:
        super().__init__("the core serves a different cloaked bundle than this edge holds; "
                         "deploy the core bundle written with this edge bundle")


class CoreIdentityMismatch(CoreUnavailable):
    """Raised when the core cannot prove it holds the key the edge pins: the edge sends it nothing sealed."""

    code = "core_identity_mismatch"


class EdgeNotAdmitted(CoreUnavailable):
    """Raised when the core refuses this edge's key: it is not enrolled there (core.allowed_edges)."""

    code = "edge_not_admitted"


class CoreTimeout(CoreError):
    """Raised when the core does not answer within the edge's timeout."""

    status_code = 504
    code = "core_timeout"


class SessionLost(CoreError):
    """Raised when the core no longer holds a session (idle expiry, restart); the edge can re-prefill."""

    code = "core_session_lost"


class CoreProtocolError(CoreError):
    """Raised when the core answers with a status or a frame the edge did not ask for."""

    code = "core_protocol_error"


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


_BY_STATUS: dict[int, type[VeilError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: RateLimited,
    503: ServiceUnavailable,
}


def from_status(status: int, message: str, code: str | None = None) -> VeilError:
    """Rebuild a typed error from a status code (e.g. one the core answered with)."""
    cls = _BY_STATUS.get(status, VeilError)
    return cls(message, code=code)
