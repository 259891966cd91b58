"""Litestar glue shared by edge and core: every error becomes OpenAI error JSON."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from veil.errors import VeilError, error_body, from_status

log = logging.getLogger("veil.http")


def json_error(exc: VeilError, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=exc.to_openai(), status_code=exc.status_code, headers=headers,
                    media_type="application/json")


def _correlation(request: Request) -> dict[str, str]:
    """The request id the route settled on (the client's, if well-formed), echoed on errors too."""
    rid = request.scope.get("state", {}).get("request_id")
    return {"x-request-id": rid} if isinstance(rid, str) else {}


def _veil_handler(request: Request, exc: VeilError) -> Response[Any]:
    if exc.status_code >= 500:
        log.warning("request failed path=%s status=%d code=%s", request.url.path, exc.status_code, exc.code)
    return json_error(exc, {**exc.headers, **_correlation(request)})


def _http_handler(request: Request, exc: HTTPException) -> Response[Any]:
    # Litestar's own errors (unknown route, wrong method, body too large); its detail is generic text.
    detail = exc.detail if exc.status_code in (400, 404, 405, 413) else "the request could not be processed"
    if exc.status_code == 404:
        detail = f"unknown route {request.method} {request.url.path}"
    elif exc.status_code == 400 and isinstance(exc.extra, list):
        # Litestar's body validation: field paths and reasons (msgspec's messages carry no values)
        problems = [f"{e.get('message')} at {e.get('key')}" for e in exc.extra if isinstance(e, dict)]
        detail = f"{detail}: {'; '.join(problems)}" if problems else detail
    err = from_status(exc.status_code, str(detail))
    return Response(content=err.to_openai(), status_code=exc.status_code, media_type="application/json",
                    headers=_correlation(request))


def _unexpected_handler(request: Request, exc: Exception) -> Response[Any]:
    # The exception text may quote user content, so only its type is logged.
    log.error("unhandled error path=%s error=%s", request.url.path, type(exc).__name__)
    return Response(content=error_body("internal server error", "server_error", "internal_error"),
                    status_code=500, media_type="application/json")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    VeilError: _veil_handler,
    HTTPException: _http_handler,
    Exception: _unexpected_handler,
}
