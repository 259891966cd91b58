"""Turning templates into responses: autoescaped Jinja2, the console's security headers on every one."""

from __future__ import annotations

import datetime
import functools
import importlib.resources
from typing import Any
from urllib.parse import quote

import jinja2
from litestar import Response
from litestar.datastructures import Cookie

# No script at all, styles from our own file only (so no inline style attributes either), forms only to
# ourselves, never framed. No CORS header is ever added: the console is same-origin only.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # not no-referrer: under it a browser sends `Origin: null` with our own forms, and the origin check could
    # no longer tell them from a sandboxed attacker's; same-origin still gives other sites no referrer at all
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
PAGE_HEADERS = {**SECURITY_HEADERS, "cache-control": "no-store"}  # pages may show secrets: never cached


def _when(unix: float | None) -> str:
    if unix is None:
        return "—"
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _number(value: int | float | None) -> str:
    return "—" if value is None else f"{value:,}"


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("admin.console", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["number"] = _number
    env.filters["path"] = lambda value: quote(str(value), safe="")  # one path segment
    return env


def page(template: str, status: int = 200, cookies: list[Cookie] | None = None, **context: Any) -> Response[str]:
    # every page's frame reads these; StrictUndefined would refuse a page that leaves one out
    context = {"me": None, "active": "", "notice": None, "error": None, **context}
    html = _env().get_template(template).render(**context)
    return Response(html, status_code=status, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS,
                    cookies=cookies)


def redirect(location: str, cookies: list[Cookie] | None = None) -> Response[str]:
    """303 See Other: after a form's POST the browser GETs the result, so a reload repeats nothing."""
    return Response("", status_code=303, headers={**PAGE_HEADERS, "location": location}, cookies=cookies)


@functools.cache
def stylesheet() -> bytes:
    return (importlib.resources.files("admin.console") / "static" / "console.css").read_bytes()
