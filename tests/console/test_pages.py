"""What the pages do and never show: a secret once, no admin key, passphrase or guardrail term anywhere, bad form
values as 400 pages, every change audited like the REST API's."""

from __future__ import annotations

import re

import openai
import pytest

from tests.console.browser import PAGES, Browser, secret_of
from tests.console.conftest import ADMIN_KEY, MODEL, PASSPHRASE, ConsoleEdge

TERM, PATTERN = "Zebulon Quartermaine", r"\bPRJ-\d{4}-ALPHA\b"


@pytest.fixture
def admin(edge: ConsoleEdge):
    b = Browser(edge.url)
    assert b.sign_in(ADMIN_KEY).status_code == 303
    yield b
    b.close()


def _everything(browser: Browser, edge: ConsoleEdge) -> str:
    """Every page the console serves to this operator, keys included, as one text."""
    texts = [browser.get(p).text for p in PAGES + ["/admin/login", "/admin/usage?since=90d"]]
    texts += [browser.get(f"/admin/keys/{k['id']}").text for k in edge.plane.policy.list_keys()]
    return "\n".join(texts)


def test_a_new_secret_is_shown_once_and_works_with_the_openai_client(edge: ConsoleEdge, admin: Browser) -> None:
    r = admin.submit("/admin/keys", {"name": "once", "scopes": ["generate", "read"], "rpm": "100", "tpm": "",
                                     "noise_rho": "", "expires_days": "30"})
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    secret = secret_of(r.text)
    assert r.text.count(secret) == 1 and "shown this once" in r.text
    key_id = re.search(r"sk-veil-([0-9a-f]+)-", secret).group(1)
    record = edge.plane.policy.get_key(key_id)
    assert record["rpm"] == 100 and record["tpm"] is None and record["expires_at"] is not None
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key=secret, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage is not None
    assert secret not in _everything(admin, edge)
    rotated = admin.submit(f"/admin/keys/{key_id}/rotate")
    new_secret = secret_of(rotated.text)
    assert new_secret != secret and rotated.text.count(new_secret) == 1
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    everything = _everything(admin, edge)
    assert new_secret not in everything and secret not in everything
    assert secret not in edge.settings.audit_log_path().read_text()
    assert new_secret not in edge.settings.audit_log_path().read_text()


def test_no_page_shows_the_admin_key_the_passphrase_or_a_guardrail_term(edge: ConsoleEdge, admin: Browser) -> None:
    assert admin.submit("/admin/guardrails", {"id": "people", "action": "protect", "terms": f"{TERM}\nOther Name",
                                              "label": "PERSON", "protection": "placeholder",
                                              "applies_to": "prompt"}).status_code == 303
    assert admin.submit("/admin/guardrails", {"id": "projects", "action": "block", "pattern": PATTERN,
                                              "applies_to": ["prompt", "output"]}).status_code == 303
    # a refused rule is not echoed either: the form comes back empty
    bad = admin.submit("/admin/guardrails", {"id": "bad", "action": "block", "terms": TERM, "pattern": PATTERN})
    assert bad.status_code == 400 and "exactly one" in bad.text
    for text in (bad.text, _everything(admin, edge)):
        for secret in (ADMIN_KEY, PASSPHRASE, TERM, "Other Name", PATTERN, "PRJ-"):
            assert secret not in text, secret
    page = admin.get("/admin/guardrails").text
    assert "2 terms" in page and "a pattern" in page
    assert {r["id"] for r in edge.plane.policy.list_guardrails()} >= {"people", "projects"}
    assert admin.submit("/admin/guardrails/projects/remove").status_code == 303
    assert admin.submit("/admin/guardrails/projects/remove").status_code == 404
    events = [(line["event"], line.get("rule_id")) for line in edge.plane.audit.tail(20)]
    assert ("guardrail.add", "people") in events and ("guardrail.remove", "projects") in events


@pytest.mark.parametrize("fields", [
    {"rpm": "abc"}, {"rpm": "-1"}, {"rpm": "0"}, {"rpm": "9" * 30}, {"tpm": "1.5"}, {"max_concurrent": "1e3"},
    {"noise_rho": "nan"}, {"noise_rho": "101"}, {"noise_rho": "-1"}, {"expires_days": "0"}, {"expires_days": "99999"},
    {"scopes": "root"}, {"scopes": []}, {"name": ""}, {"name": "x" * 101},
])
def test_bad_key_forms_are_400_pages(edge: ConsoleEdge, admin: Browser, fields: dict) -> None:
    before = len(edge.plane.policy.list_keys())
    r = admin.submit("/admin/keys", {"name": "bad form", "scopes": "generate", **fields})
    assert r.status_code == 400 and "text/html" in r.headers["content-type"], r.text
    assert 'class="error"' in r.text and len(edge.plane.policy.list_keys()) == before


@pytest.mark.parametrize("path, fields, status", [
    ("/admin/guardrails", {"id": "x", "action": "nuke", "terms": "a"}, 400),
    ("/admin/guardrails", {"id": "bad id!", "action": "block", "terms": "a"}, 400),
    ("/admin/guardrails", {"id": "x", "action": "block", "pattern": "(unclosed"}, 400),
    ("/admin/guardrails", {"id": "x", "action": "protect", "entities": "SECRET_SAUCE"}, 400),
    ("/admin/guardrails", {"id": "x", "action": "redact", "terms": "a", "applies_to": "output"}, 400),
    ("/admin/guardrails", {"id": "x", "action": "block", "pattern": "a.*", "applies_to": "output"}, 400),
    ("/admin/guardrails/nope/remove", {}, 404),
    ("/admin/keys/nope/revoke", {}, 404),
    ("/admin/keys/nope/rotate", {}, 404),
    ("/admin/keys/nope/limits", {"rpm": "5"}, 404),
    ("/admin/keys/nope/noise", {"noise_rho": "1"}, 404),
    ("/admin/keys/adminboot/limits", {"rpm": "x"}, 400),
    ("/admin/keys/adminboot/noise", {"noise_rho": "lots"}, 400),
    ("/admin/keys/%3Cimg%20src%3Dx%3E/revoke", {}, 404),
])
def test_bad_changes_are_html_pages_with_their_status(admin: Browser, path: str, fields: dict, status: int) -> None:
    r = admin.submit(path, fields)
    assert r.status_code == status and "text/html" in r.headers["content-type"], r.text
    assert "Traceback" not in r.text and "<img" not in r.text  # an id from the path is escaped


@pytest.mark.parametrize("query", ["since=bogus", "since=9999d", "since=2999-01-01", "n=0", "n=x", "n=100000"])
def test_bad_queries_are_400_pages(admin: Browser, query: str) -> None:
    path = "/admin/usage" if query.startswith("since") else "/admin/audit"
    r = admin.get(f"{path}?{query}")
    assert r.status_code == 400 and "text/html" in r.headers["content-type"]


def test_limits_and_noise_are_saved_and_audited_like_the_rest_api(edge: ConsoleEdge, admin: Browser) -> None:
    record, _ = edge.plane.policy.create_key("limited", ["generate"], rpm=10, tpm=1000, noise_rho=0.5)
    base = f"/admin/keys/{record['id']}"
    r = admin.submit(base + "/limits", {"rpm": "60", "tpm": "", "max_concurrent": "2"})
    assert r.status_code == 303 and r.headers["location"] == base + "?done=limits"
    assert "The limits were saved" in admin.get(r.headers["location"]).text
    assert admin.submit(base + "/noise", {"noise_rho": ""}).status_code == 303
    now = edge.plane.policy.get_key(record["id"])
    assert (now["rpm"], now["tpm"], now["max_concurrent"], now["noise_rho"]) == (60, None, 2, None)
    assert admin.submit(base + "/noise", {"noise_rho": "2.5"}).status_code == 303
    assert edge.plane.policy.get_key(record["id"])["noise_rho"] == 2.5
    assert admin.submit(base + "/revoke").status_code == 303
    page = admin.get(base).text
    assert "revoked" in page and "/rotate" not in page
    lines = [line for line in edge.plane.audit.tail(30) if line.get("key_id") == record["id"]]
    assert [line["event"] for line in lines] == ["key.limits", "key.noise", "key.noise", "key.revoke"]
    assert all(line["actor"] == "adminboot" for line in lines)
    assert (lines[0]["rpm"], lines[0]["tpm"], lines[0]["max_concurrent"]) == (60, None, 2)


def test_usage_shows_what_the_client_used(edge: ConsoleEdge, admin: Browser) -> None:
    record, secret = edge.plane.policy.create_key("usage probe", ["generate"])
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key=secret, max_retries=0)
    used = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4).usage for _ in range(2)]
    page = admin.get(f"/admin/usage?key={record['id']}&since=7d").text
    row = re.search(rf"<th scope=\"row\"><code>{record['id']}</code></th><td>usage probe</td>(.*?)</tr>", page, re.S)
    assert row, page
    cells = [int(c.replace(",", "")) for c in re.findall(r'<td class="num">([\d,]+)</td>', row.group(1))]
    assert cells[:3] == [2, sum(u.prompt_tokens for u in used), sum(u.completion_tokens for u in used)]
    assert '<rect class="bar-prompt_tokens"' in page and "<svg" in page
