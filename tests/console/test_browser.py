"""The console end to end in headless Chromium (Debian's, driven by Playwright) against real core and edge
processes: auth on, an encrypted store, the audit log and Redis. A full-page screenshot of each page is written
to $VEIL_CONSOLE_SCREENSHOTS (default artifacts/console/)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Iterator

import openai
import pytest

from tests.conftest import REDIS_URL, REPO, SMOL_NAME
from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, base_env, free_port, ready_all

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# the machines' network is closed: without these Chromium waits on connections it will never get
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN_KEY = "sk-veil-console-" + secrets.token_urlsafe(32)
PASSPHRASE = "console e2e passphrase " + secrets.token_hex(6)
TERMS = ("Dana Whitfield", "Kenji Takahashi")


@pytest.fixture(scope="module")
def edge(smol_bundles, key_file: Path, tmp_path_factory, rdb) -> Iterator[Server]:
    edge_bundle, core_bundle = smol_bundles
    tmp = tmp_path_factory.mktemp("console-e2e")
    wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 8)
    core_port, edge_port = free_port(), free_port()
    core = Server("core", base_env(tmp, VEIL_CORE_PORT=str(core_port), VEIL_CORE_BUNDLE=str(core_bundle), **wiring),
                  core_port, tmp / "core.log")
    edge = None
    try:
        edge = Server("edge", base_env(
            tmp, VEIL_EDGE_PORT=str(edge_port), VEIL_AUTH_ENABLED="true", VEIL_POLICY_PASSPHRASE=PASSPHRASE,
            VEIL_ADMIN_KEY=ADMIN_KEY, VEIL_REDIS_URL=REDIS_URL, VEIL_BUNDLE_EDGE_DIR=str(edge_bundle),
            VEIL_BUNDLE_KEY_FILE=str(key_file), VEIL_MODEL_NAME=SMOL_NAME, VEIL_EDGE_CORE_URL=core.url, **wiring),
            edge_port, tmp / "edge.log")
        ready_all(core, edge)
        yield edge
    finally:
        for server in (edge, core):
            if server is not None:
                server.stop()
        logs = "".join((tmp / name).read_text() for name in ("core.log", "edge.log"))
        assert ADMIN_KEY not in logs and PASSPHRASE not in logs


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("VEIL_CONSOLE_SCREENSHOTS") or REPO / "artifacts" / "console")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(shots: Path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"these tests need Debian's chromium at {CHROMIUM}: run scripts/install_browser.sh")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def test_an_operator_manages_a_key_from_sign_in_to_revocation(edge: Server, page, shots: Path) -> None:
    seen: list[str] = []
    refused_by_csp: list[str] = []  # an inline style or script would show up here
    page.on("console", lambda msg: refused_by_csp.append(msg.text) if "Content Security Policy" in msg.text else None)

    def visit(name: str) -> str:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        seen.append(page.content())
        return seen[-1]

    page.goto(edge.url + "/admin/")
    assert page.url.endswith("/admin/login")
    visit("01-sign-in")
    page.fill("#api_key", ADMIN_KEY)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert page.url.endswith("/admin/keys"), page.content()

    # create a key: its secret is on this page only
    page.fill("#name", "ci-bot")
    page.check("input[name=scopes][value=read]")
    page.fill("#rpm", "60")
    page.fill("#tpm", "20000")
    page.click("text=Create key")
    secret = page.input_value("#secret")
    assert secret.startswith("sk-veil-") and "shown this once" in visit("03-new-secret")
    key_id = re.match(r"sk-veil-([0-9a-f]+)-", secret).group(1)
    page.goto(edge.url + "/admin/keys")
    assert secret not in visit("02-keys") and "ci-bot" in seen[-1]

    # use it through the openai client
    client = openai.OpenAI(base_url=edge.url + "/v1", api_key=secret, max_retries=0)
    used = [client.chat.completions.create(model=SMOL_NAME, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": prompt}]).usage
            for prompt in ("What is the capital of France?", "Name a colour.")]

    # revoke it: the client is refused from then on
    page.goto(edge.url + f"/admin/keys/{key_id}")
    visit("04-key")
    page.click("text=Revoke key")
    assert "The key was revoked" in visit("05-key-revoked")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=SMOL_NAME, max_tokens=4, messages=[{"role": "user", "content": "hi"}])

    # the usage page has its requests and tokens
    page.goto(edge.url + "/admin/usage")
    page.select_option("#key", key_id)
    page.click("text=Show")
    visit("06-usage")
    row = page.locator("tbody tr", has=page.locator(f"th:has-text('{key_id}')")).first
    cells = [int(c.replace(",", "")) for c in row.locator("td.num").all_inner_texts()]
    assert cells[:3] == [2, sum(u.prompt_tokens for u in used), sum(u.completion_tokens for u in used)]
    assert page.locator("svg rect.bar-prompt_tokens").count() >= 1

    # a protect rule: its terms never come back
    page.goto(edge.url + "/admin/guardrails")
    page.fill("#id", "customers")
    page.select_option("#action", "protect")
    page.fill("#terms", "\n".join(TERMS))
    page.fill("#label", "PERSON")
    page.fill("#description", "customer names stay at the edge")
    page.click("text=Add rule")
    page.fill("#id", "pii")
    page.select_option("#action", "protect")
    for entity in ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD"):
        page.check(f"input[name=entities][value={entity}]")
    page.click("text=Add rule")
    text = visit("07-guardrails")
    assert "The rule was added" in text and "2 terms" in text and "customers" in text

    # the audit log: the changes above, and a chain that verifies
    page.goto(edge.url + "/admin/audit")
    page.click("text=Verify the chain")
    text = visit("08-audit")
    assert "The chain holds" in text
    for event in ("console.signin", "key.create", "key.revoke", "guardrail.add"):
        assert event in text, event

    page.goto(edge.url + "/admin/core")
    text = visit("09-core")
    assert "answers for this edge" in text and SMOL_NAME in text

    page.click("text=Sign out")
    assert page.url.endswith("/admin/login")
    page.goto(edge.url + "/admin/keys")
    assert page.url.endswith("/admin/login")

    everything = "\n".join(seen)
    for never in (ADMIN_KEY, PASSPHRASE, *TERMS):
        assert never not in everything
    assert everything.count(secret) == 1  # on the page that created it, nowhere else
    assert refused_by_csp == []
