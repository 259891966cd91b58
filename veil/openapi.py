"""What the OpenAPI document says about errors: every error body is OpenAI's shape, and each route lists the
statuses it can really answer (Litestar would document only its own 400 body, in another shape)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from litestar.openapi.spec import Operation
from litestar.openapi.spec.media_type import OpenAPIMediaType
from litestar.openapi.spec.response import OpenAPIResponse

ERROR: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}

# the statuses of a route that authenticates its caller
AUTHENTICATED = {401: "no, or a wrong, credential", 403: "the credential lacks the route's scope",
                 503: "the policy store or the JWT issuer's keys are unavailable"}
WITH_BODY = {400: "malformed JSON or an invalid field", 413: "the body is over edge.max_request_bytes"}
WITH_PATH = {400: "an invalid path parameter", 404: "no such object"}


def error_response(description: str) -> OpenAPIResponse:
    return OpenAPIResponse(description=description,
                           content={"application/json": OpenAPIMediaType(schema=ERROR)})  # type: ignore[arg-type]


@dataclasses.dataclass
class DocumentedOperation(Operation):
    """An operation: its success responses as Litestar made them, and `errors` (status -> when) with the OpenAI
    error body in place of whatever Litestar would say about errors."""

    errors: ClassVar[dict[int, str]] = {}

    def __post_init__(self) -> None:
        kept = {code: r for code, r in (self.responses or {}).items() if int(code) < 400}
        self.responses = {**kept, **{str(c): error_response(t) for c, t in sorted(self.errors.items())}}


def documented(*statuses: dict[int, str]) -> type[Operation]:
    """A route's operation class, documenting the union of these error statuses."""
    errors: dict[int, str] = {}
    for group in statuses:
        errors.update(group)
    return type("DocumentedOperation", (DocumentedOperation,), {"errors": errors})
