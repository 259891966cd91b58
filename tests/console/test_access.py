"""Who gets in: every console route refuses without a session, sign-in needs an admin API key, a session ends
with its key, and auth off answers on loopback names only."""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest

from tests.console.browser import Browser
from tests.console.conftest import ADMIN_KEY, ConsoleEdge

GET_ROUTES = ["/admin/", "/admin/keys", "/admin/keys/adminboot", "/admin/guardrails", "/admin/usage", "/admin/audit",
              "/admin/audit?verify=1", "/admin/core"]
POST_ROUTES = ["/admin/logout", "/admin/keys", "/admin/keys/adminboot/revoke", "/admin/keys/adminboot/rotate",
               "/admin/keys/adminboot/limits", "/admin/keys/adminboot/noise", "/admin/guardrails",
               "/admin/guardrails/any/remove"]


@pytest.fixture
def browser(edge: ConsoleEdge):
    b = Browser(edge.url)
    yield b
    b.close()


def _admin(browser: Browser, key: str = ADMIN_KEY) -> Browser:
    r = browser.sign_in(key)
    assert r.status_code == 303 and r.headers["location"] == "/admin/keys", r.text
    return browser


@pytest.mark.parametrize("cookie", [None, "not-a-session"])
def test_without_a_session_pages_send_to_sign_in_and_changes_get_401(edge: ConsoleEdge, cookie) -> None:
    b = Browser(edge.url)
    if cookie:
        b.http.cookies.set("veil_console", cookie, path="/admin")
    for path in GET_ROUTES:
        r = b.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/admin/login", path
    for path in POST_ROUTES:
        r = b.http.post(path, data={"csrf_token": "x", "name": "n", "scopes": "admin"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html"), path
        assert "Sign in" in r.text
    assert b.get("/admin/login").status_code == 200
    assert b.get("/admin/static/console.css").status_code == 200
    assert len(edge.plane.policy.list_keys()) >= 1 and not any(k["name"] == "n" for k in edge.plane.policy.list_keys())


def test_sign_in_needs_an_admin_api_key(edge: ConsoleEdge, browser: Browser) -> None:
    record, generate_key = edge.plane.policy.create_key("model user", ["generate", "read"])
    r = browser.sign_in(generate_key)
    assert r.status_code == 403 and "lacks the admin scope" in r.text and "veil_console=" not in r.headers.get(
        "set-cookie", "")
    for wrong in ("", "sk-veil-nothere-" + "a" * 43, ADMIN_KEY + "x"):
        r = browser.sign_in(wrong)
        assert r.status_code == 401 and "refused" in r.text.lower() or "Paste" in r.text
        assert wrong not in r.text or not wrong
    assert browser.get("/admin/keys").status_code == 303
    lines = edge.plane.audit.tail(50)
    assert any(line["event"] == "auth.denied" and line["actor"] == record["id"] for line in lines)
    assert any(line["event"] == "auth.failure" and line.get("path") == "/admin/login" for line in lines)


def test_a_signed_in_admin_sees_every_page_with_security_headers(edge: ConsoleEdge, browser: Browser) -> None:
    r = browser.sign_in(ADMIN_KEY)
    cookie = r.headers["set-cookie"]
    assert re.search(r"veil_console=[^;]+; .*HttpOnly", cookie) and "Path=/admin" in cookie
    assert "samesite=strict" in cookie.lower() and "secure" not in cookie.lower()  # plain http on loopback
    for path in ["/admin/keys", "/admin/keys/adminboot", "/admin/guardrails", "/admin/usage", "/admin/usage?since=30d",
                 "/admin/audit", "/admin/audit?verify=1&n=50", "/admin/core", "/admin/static/console.css"]:
        r = browser.get(path, headers={"origin": "https://evil.example"})
        assert r.status_code == 200, (path, r.text)
        h = r.headers
        assert h["content-security-policy"] == ("default-src 'none'; style-src 'self'; img-src 'self'; "
                                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "same-origin"
        assert not [k for k in h if k.lower().startswith("access-control-")], path
        if path.endswith(".css"):
            continue
        assert h["cache-control"] == "no-store" and "<script" not in r.text and " style=" not in r.text
        assert "<nav" in r.text and "<h1>" in r.text
    preflight = browser.http.options("/admin/keys", headers={"origin": "https://evil.example",
                                                            "access-control-request-method": "POST"})
    assert not [k for k in preflight.headers if k.lower().startswith("access-control-")]
    assert "The chain holds" in browser.get("/admin/audit?verify=1").text
    assert "answers for this edge" in browser.get("/admin/core").text
    assert browser.get("/admin/").headers["location"] == "/admin/keys"
    assert browser.get("/admin/login").headers["location"] == "/admin/keys"


def test_a_session_ends_when_its_key_is_rotated_or_revoked(edge: ConsoleEdge, browser: Browser) -> None:
    _admin(browser)
    for action in ("rotate", "revoke"):
        record, secret = edge.plane.policy.create_key(f"second admin {action}", ["admin"])
        other = _admin(Browser(edge.url), secret)
        assert other.get("/admin/keys").status_code == 200
        r = browser.submit(f"/admin/keys/{record['id']}/{action}")
        assert r.status_code in (200, 303), r.text
        r = other.get("/admin/keys")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login", action
        assert other.http.post("/admin/keys", data={"csrf_token": "x"}).status_code == 401
        other.close()
    # an operator rotating their own key sees the new secret once, then must sign in with it
    record, secret = edge.plane.policy.create_key("self-rotating admin", ["admin"])
    me = _admin(Browser(edge.url), secret)
    r = me.submit(f"/admin/keys/{record['id']}/rotate")
    assert r.status_code == 200 and "shown this once" in r.text
    assert me.get("/admin/keys").status_code == 303
    me.close()


def test_sign_out_ends_the_session_and_is_audited(edge: ConsoleEdge, browser: Browser) -> None:
    _admin(browser)
    sid = browser.http.cookies.get("veil_console")
    token = browser.token()
    r = browser.submit("/admin/logout", token=token)
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert "veil_console=" in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()
    stale = Browser(edge.url)
    stale.http.cookies.set("veil_console", sid, path="/admin")
    assert stale.get("/admin/keys").status_code == 303
    assert stale.http.post("/admin/keys", data={"csrf_token": token, "name": "x", "scopes": "read"}).status_code == 401
    events = [(line["event"], line["actor"]) for line in edge.plane.audit.tail(30)]
    assert ("console.signin", "adminboot") in events and ("console.signout", "adminboot") in events


def test_changes_need_the_session_token_and_our_origin(edge: ConsoleEdge, browser: Browser) -> None:
    _admin(browser)
    before = len(edge.plane.policy.list_keys())
    form = {"name": "csrf probe", "scopes": "generate"}
    for token, headers in [("", {}), ("wrong-token", {}), (None, {"origin": "https://evil.example"}),
                           (None, {"origin": "null"}), (None, {"sec-fetch-site": "cross-site"})]:
        r = browser.submit("/admin/keys", form, token=token, headers=headers)
        assert r.status_code == 403 and "text/html" in r.headers["content-type"], (token, headers)
        assert "sk-veil-" not in r.text
    r = browser.http.post("/admin/keys", data=form)  # no token field at all
    assert r.status_code == 403
    assert len(edge.plane.policy.list_keys()) == before
    host = edge.url.split("//")[1]
    r = browser.submit("/admin/keys", form, headers={"origin": f"http://{host}", "sec-fetch-site": "same-origin"})
    assert r.status_code == 201 and len(edge.plane.policy.list_keys()) == before + 1


def test_the_sign_in_form_has_its_own_token(edge: ConsoleEdge) -> None:
    b = Browser(edge.url)
    r = b.http.post("/admin/login", data={"api_key": ADMIN_KEY})  # no form token, no cookie
    assert r.status_code == 403 and "veil_console=" not in r.headers.get("set-cookie", "").replace("veil_console_login", "")
    token = b.token("/admin/login")
    r = b.http.post("/admin/login", data={"csrf_token": token + "x", "api_key": ADMIN_KEY})
    assert r.status_code == 403
    r = b.http.post("/admin/login", data={"csrf_token": b.token("/admin/login"), "api_key": ADMIN_KEY},
                    headers={"origin": "https://evil.example"})
    assert r.status_code == 403
    assert ADMIN_KEY not in r.text
    b.close()


def test_replicas_share_sessions_through_redis_which_holds_no_session_id(replicas: list[ConsoleEdge], rdb) -> None:
    a, b = replicas
    browser = _admin(Browser(a.url))
    sid = browser.http.cookies.get("veil_console")
    stored = rdb.get("veil:console:" + hashlib.sha256(sid.encode()).hexdigest())
    assert stored is not None and sid.encode() not in stored and ADMIN_KEY.encode() not in stored
    assert 0 < rdb.pttl("veil:console:" + hashlib.sha256(sid.encode()).hexdigest()) <= 30 * 60 * 1000
    other = Browser(b.url)
    other.http.cookies.set("veil_console", sid, path="/admin")
    assert other.get("/admin/keys").status_code == 200  # the other replica knows the session
    token = other.token()
    assert other.submit("/admin/logout", token=token).status_code == 303
    assert browser.get("/admin/keys").status_code == 303  # signed out on both
    assert rdb.get("veil:console:" + hashlib.sha256(sid.encode()).hexdigest()) is None
    browser.close()
    other.close()


def test_with_auth_off_the_console_opens_for_the_local_user_on_loopback_names_only(open_edge: ConsoleEdge) -> None:
    b = Browser(open_edge.url)
    page = b.get("/admin/login")
    assert page.status_code == 200 and "Authentication is off" in page.text and 'type="password"' not in page.text
    r = b.sign_in()
    assert r.status_code == 303
    assert b.get("/admin/keys").status_code == 200
    port = open_edge.url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert b.get("/admin/keys", headers={"host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        for path in ("/admin/keys", "/admin/login", "/admin/static/console.css"):
            assert b.get(path, headers={"host": host}).status_code == 403, (host, path)
        r = b.submit("/admin/keys", {"name": "rebound", "scopes": "generate"}, headers={"host": host})
        assert r.status_code == 403
    assert b.submit("/admin/keys", {"name": "local", "scopes": "generate"}).status_code == 201
    b.close()


def test_the_console_stays_out_of_the_openapi_document(edge: ConsoleEdge) -> None:
    paths = httpx.get(edge.url + "/schema/openapi.json", timeout=30).json()["paths"]
    assert "/admin/v1/keys" in paths
    assert [p for p in paths if p.startswith("/admin") and not p.startswith("/admin/v1/")] == []
