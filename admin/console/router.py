"""The console's routes under /admin (beside the REST API's /admin/v1), its stylesheet, and its error pages.

Left out of the OpenAPI document: these are pages for a browser, not an API.
"""

from __future__ import annotations

import logging

from litestar import Request, Response, Router, get
from litestar.exceptions import HTTPException

from admin.console.audit_page import audit_log
from admin.console.core_page import core
from admin.console.guard import SignInRequired, check_host
from admin.console.guardrail_pages import guardrail_add, guardrail_remove, guardrails_list
from admin.console.keys_pages import key_create, key_detail, key_limits, key_noise, key_revoke, key_rotate, keys_list
from admin.console.render import SECURITY_HEADERS, page, redirect, stylesheet
from admin.console.signin import index, login, login_form, logout
from admin.console.usage_page import usage
from veil.errors import VeilError

log = logging.getLogger("veil.admin.console")

HEADINGS = {400: "That did not work", 401: "Sign in first", 403: "Refused", 404: "Not found",
            405: "Not allowed", 413: "Too large", 503: "Not available"}
_HTTP_MESSAGES = {400: "The request could not be read.", 404: "There is no such page.",
                  405: "This page does not take that method.", 413: "The form is too large."}


@get("/static/console.css")
async def console_css(request: Request) -> Response[bytes]:
    check_host(request)
    return Response(stylesheet(), media_type="text/css; charset=utf-8",
                    headers={**SECURITY_HEADERS, "cache-control": "no-cache"})


def error_page(request: Request, exc: Exception) -> Response[str]:
    """Every console error as an HTML page with its status: never a stack trace, never a form value."""
    if isinstance(exc, SignInRequired) and request.method in ("GET", "HEAD"):
        return redirect("/admin/login")
    if isinstance(exc, VeilError):
        status, message = exc.status_code, exc.message
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        message = _HTTP_MESSAGES.get(status, "The request could not be processed.")
    else:
        # the exception's text may quote a form value, so only its type is logged
        log.error("console error path=%s error=%s", request.url.path, type(exc).__name__)
        status, message = 500, "Something went wrong on this edge; the error was logged."
    return page("error.html", status, heading=HEADINGS.get(status, "Error"), message=message, code=status)


console_router = Router(
    path="/admin",
    route_handlers=[index, login_form, login, logout, keys_list, key_create, key_detail, key_revoke, key_rotate,
                    key_limits, key_noise, guardrails_list, guardrail_add, guardrail_remove, usage, audit_log, core,
                    console_css],
    exception_handlers={VeilError: error_page, HTTPException: error_page, Exception: error_page},
    include_in_schema=False,
)
