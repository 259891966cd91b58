"""The fuzz campaign against a real core and an auth-enabled edge (tests/fuzz/campaign.py).

CI runs at least 500 generated cases; `make fuzz` runs the full campaign (FUZZ_EXAMPLES=50: over
5,000 cases). The report lands in FUZZ_REPORT (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import httpx
import pytest

from tests.fuzz.campaign import IDENTITIES, leaked, schemathesis_run, still_serves
from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, base_env, free_port, ready_all

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
PASSPHRASE = "fuzz passphrase " + secrets.token_hex(8)
ADMIN_KEY = "sk-veil-fuzzadmin-" + secrets.token_urlsafe(32)
CANARY = "ZEPHYR-CANARY-" + secrets.token_hex(4)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "3"))
MIN_CASES = int(os.environ.get("FUZZ_MIN_CASES", "500"))


@pytest.fixture(scope="module")
def servers(tiny_bundles, key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """A core whose sessions hold 96 tokens, so fuzzed max_tokens stay cheap, and one auth-enabled edge."""
    _, edge_bundle, core_bundle = tiny_bundles["llama"]
    tmp = tmp_path_factory.mktemp("fuzz")
    core_port, edge_port = free_port(), free_port()
    wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 16)
    core = Server("core", base_env(tmp, VEIL_CORE_PORT=str(core_port), VEIL_CORE_BUNDLE=str(core_bundle),
                                   VEIL_CORE_MAX_TOKENS_PER_SESSION="96", **wiring), core_port,
                  tmp / "core.log")
    edge = Server("edge", base_env(tmp, VEIL_EDGE_PORT=str(edge_port), VEIL_AUTH_ENABLED="true",
                                   VEIL_POLICY_PASSPHRASE=PASSPHRASE, VEIL_ADMIN_KEY=ADMIN_KEY,
                                   VEIL_BUNDLE_EDGE_DIR=str(edge_bundle), VEIL_BUNDLE_KEY_FILE=str(key_file),
                                   VEIL_MODEL_NAME=MODEL, VEIL_EDGE_CORE_URL=core.url, **wiring),
                  edge_port, tmp / "edge.log")
    ready_all(core, edge)
    try:
        yield {"core": core, "edge": edge, "tmp": tmp}
    finally:
        edge.stop()
        core.stop()


def _key(edge: Server, scopes: list[str]) -> str:
    r = httpx.post(edge.url + "/admin/v1/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30,
                   json={"name": "fuzz-" + "-".join(scopes), "scopes": scopes})
    assert r.status_code == 201, r.text
    return r.json()["secret"]


def test_fuzz_campaign_finds_no_server_error_and_the_edge_still_serves(servers) -> None:
    edge = servers["edge"]
    report = Path(os.environ.get("FUZZ_REPORT") or servers["tmp"] / "report")
    report.mkdir(parents=True, exist_ok=True)
    keys = {"anonymous": None, "read": _key(edge, ["read"]), "metrics": _key(edge, ["metrics"]),
            "generate": _key(edge, ["generate"]), "admin": ADMIN_KEY}
    survivor = _key(edge, ["generate"])  # never given to the fuzzer
    # a prompt with a canary goes through once, so the log search below has something to miss
    r = httpx.post(edge.url + "/v1/chat/completions", headers={"authorization": f"Bearer {survivor}"}, timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": f"say {CANARY}"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    runs = [schemathesis_run(edge.url, who, keys[who], EXAMPLES, seed=20261202 + i, report_dir=report,
                             model=MODEL)
            for i, who in enumerate(IDENTITIES)]
    # the coverage phase sends schema-shaped bodies naming no served model; this run goes deep into chat
    chat = schemathesis_run(edge.url, "generate", keys["generate"], 20 * EXAMPLES, seed=20261299, report_dir=report,
                            model=MODEL, only_path="/v1/chat/completions", phases="fuzzing", name="generate-chat")
    runs.append(chat)
    summary = {"cases": sum(r.cases for r in runs), "examples_per_operation": EXAMPLES,
               "runs": [r.__dict__ for r in runs]}
    (report / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"cases": summary["cases"], **{r.identity: r.cases for r in runs}, "chat": chat.statuses}))
    assert all(not r.failures for r in runs), [(r.identity, r.failures) for r in runs]
    assert all(not r.errors for r in runs), [(r.identity, r.errors) for r in runs]
    assert summary["cases"] >= MIN_CASES
    assert chat.statuses.get(200, 0) >= 5, chat.statuses  # generations really ran
    assert edge.running() and servers["core"].running()
    assert still_serves(edge.url, survivor, MODEL)
    logs = [edge.log(), servers["core"].log()]
    assert leaked(logs, [ADMIN_KEY, PASSPHRASE, CANARY, survivor, *(k for k in keys.values() if k)]) == []
    assert all("Traceback" not in text for text in logs)
