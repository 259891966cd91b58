"""A cookie-keeping HTTP client that uses the console as a browser would: GET a form, POST it with its token."""

from __future__ import annotations

import html
import re

import httpx

_TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
_SECRET = re.compile(r'id="secret" class="secret" type="text" readonly value="([^"]+)"')


class Browser:
    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, follow_redirects=False, timeout=30)

    def close(self) -> None:
        self.http.close()

    def get(self, path: str, **kw) -> httpx.Response:
        return self.http.get(path, **kw)

    def token(self, path: str = "/admin/keys") -> str:
        """The CSRF token of the form on `path` (the session's, or the sign-in form's)."""
        r = self.get(path)
        assert r.status_code == 200, (path, r.status_code)
        found = _TOKEN.search(r.text)
        assert found, path
        return html.unescape(found.group(1))

    def sign_in(self, key: str = "") -> httpx.Response:
        return self.http.post("/admin/login", data={"csrf_token": self.token("/admin/login"), "api_key": key})

    def submit(self, path: str, data: dict | None = None, token: str | None = None, **kw) -> httpx.Response:
        """POST a console form with this session's token (or `token`)."""
        fields = {"csrf_token": self.token() if token is None else token, **(data or {})}
        return self.http.post(path, data=fields, **kw)


def secret_of(page: str) -> str:
    found = _SECRET.search(page)
    assert found, "no secret on the page"
    return html.unescape(found.group(1))


PAGES = ["/admin/keys", "/admin/guardrails", "/admin/usage", "/admin/audit", "/admin/audit?verify=1", "/admin/core"]
