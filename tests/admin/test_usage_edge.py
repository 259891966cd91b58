"""Per-key usage through real edges: the figures equal what the clients were told, refusals are counted by reason,
and the counts live where the policy plane's rules put them (Redis shared by replicas, or a file that outlives a
restart)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, base_env, free_port

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
PASSPHRASE = "usage ledger passphrase " + secrets.token_hex(4)
ADMIN_KEY = "sk-veil-adminboot-" + secrets.token_urlsafe(32)
MODEL = "tiny-llama"
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "refused_401", "refused_403", "refused_429",
            "refused_policy", "protected_spans")


def _edge_env(tmp: Path, core: Server, edge_bundle: Path, key_file: Path, wiring: dict[str, str],
              redis_url: str) -> dict[str, str]:
    env = dict(VEIL_AUTH_ENABLED="true", VEIL_POLICY_PASSPHRASE=PASSPHRASE, VEIL_POLICY_STORE=str(tmp / "policy.store"),
               VEIL_POLICY_AUDIT_LOG=str(tmp / "audit.log"), VEIL_ADMIN_KEY=ADMIN_KEY,
               VEIL_BUNDLE_EDGE_DIR=str(edge_bundle), VEIL_BUNDLE_KEY_FILE=str(key_file), VEIL_MODEL_NAME=MODEL,
               VEIL_EDGE_CORE_URL=core.url, **wiring)
    return {**env, "VEIL_REDIS_URL": redis_url} if redis_url else env


@pytest.fixture(scope="module")
def deployment(tiny_bundles, key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """One core; two edges sharing Redis (and store), and a factory for an edge without Redis."""
    _, edge_bundle, core_bundle = tiny_bundles["llama"]
    tmp = tmp_path_factory.mktemp("usage")
    wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 16)
    port = free_port()
    core = Server("core", base_env(tmp, VEIL_CORE_PORT=str(port), VEIL_CORE_BUNDLE=str(core_bundle), **wiring),
                  port, tmp / "core.log").wait_ready()
    edges: list[Server] = []

    def start(home: Path, redis_url: str, name: str) -> Server:
        port = free_port()
        env = base_env(home, VEIL_EDGE_PORT=str(port),
                       **_edge_env(home, core, edge_bundle, key_file, wiring, redis_url))
        edges.append(Server("edge", env, port, home / f"{name}.log").wait_ready())
        return edges[-1]

    try:
        shared = tmp / "shared"
        shared.mkdir()
        yield {"replicas": [start(shared, REDIS_URL, "a"), start(shared, REDIS_URL, "b")], "start": start,
               "tmp": tmp}
    finally:
        for s in edges + [core]:
            s.stop()


def _admin(edge: Server, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, edge.url + path, json=body, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=30)


def _new_key(edge: Server, **body) -> tuple[str, str]:
    r = _admin(edge, "POST", "/admin/v1/keys", {"name": "usage", "scopes": ["generate", "read"], **body})
    assert r.status_code == 201, r.text
    return r.json()["key"]["id"], r.json()["secret"]


def _client(edge: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.url + "/v1", api_key=key, max_retries=0)


def _usage(edge: Server, key_id: str) -> dict[str, int]:
    r = _admin(edge, "GET", f"/admin/v1/usage?key_id={key_id}&since=1d")
    assert r.status_code == 200, r.text
    body = r.json()
    assert all(row["principal"] == key_id for row in body["data"])
    return body["total"]


def _settled(edge: Server, key_id: str, want: dict[str, int]) -> dict[str, int]:
    """The usage once another replica's counts have arrived: each edge writes its counts about once a second
    (a report from the edge that counted them includes them at once)."""
    deadline = time.monotonic() + 5
    while True:
        total = _usage(edge, key_id)
        if all(total[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


def test_usage_equals_the_sum_of_the_usage_the_clients_received(deployment) -> None:
    a, b = deployment["replicas"]
    key_id, secret = _new_key(a)
    prompt, completion, requests = 0, 0, 0
    for edge in (a, b):  # both replicas count into the same Redis
        client = _client(edge, secret)
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                              max_tokens=5)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}],
                                                max_tokens=4, stream=True, stream_options={"include_usage": True})
        streamed = [c.usage for c in stream if c.usage is not None]
        legacy = client.completions.create(model=MODEL, prompt=["one", "two words"], max_tokens=3)
        reply = client.responses.create(model=MODEL, input="a short question", max_output_tokens=6)
        prompt += chat.usage.prompt_tokens + streamed[0].prompt_tokens + legacy.usage.prompt_tokens \
            + reply.usage.input_tokens
        completion += chat.usage.completion_tokens + streamed[0].completion_tokens + legacy.usage.completion_tokens \
            + reply.usage.output_tokens
        requests += 4
    want = {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}
    for edge in (a, b):
        total = _settled(edge, key_id, want)
        assert {k: total[k] for k in want} == want
    me = httpx.get(a.url + "/v1/me?since=1d", headers={"authorization": f"Bearer {secret}"}, timeout=30).json()
    assert me["usage"]["total"]["prompt_tokens"] == prompt and me["usage"]["total"]["completion_tokens"] == completion
    assert [row["principal"] for row in me["usage"]["data"]] == [key_id]


def test_refusals_are_counted_by_reason_against_the_key(deployment) -> None:
    a, b = deployment["replicas"]
    key_id, secret = _new_key(a, rpm=2)
    with pytest.raises(openai.AuthenticationError):  # a real key id with a wrong secret
        _client(a, secret + "x").models.list()
    _client(a, secret).models.list()
    _client(b, secret).models.list()
    with pytest.raises(openai.RateLimitError):  # models.list is not limited, but this third generation is
        for _ in range(3):
            _client(a, secret).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                       max_tokens=1)
    reader_id, reader = _new_key(a, scopes=["read"])
    with pytest.raises(openai.PermissionDeniedError):
        _client(b, reader).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=1)
    total = _settled(a, key_id, {"refused_401": 1, "refused_429": 1, "requests": 2})
    assert (total["refused_401"], total["refused_429"], total["requests"]) == (1, 1, 2)
    assert _usage(b, reader_id)["refused_403"] == 1
    # an unknown key id is not a row of its own: it counts as "unknown"
    made_up = "sk-veil-" + secrets.token_hex(6) + "-nothing"
    with pytest.raises(openai.AuthenticationError):
        _client(a, made_up).models.list()
    every = _admin(a, "GET", "/admin/v1/usage?since=1d").json()["data"]
    assert "unknown" in {row["principal"] for row in every}
    assert not any(made_up.split("-")[2] in row["principal"] for row in every)


def test_policy_blocks_and_protected_spans_are_counted(deployment) -> None:
    a, _ = deployment["replicas"]
    blocked, named = f"codeword{secrets.token_hex(3)}", f"Zorblax{secrets.token_hex(2)}"
    rules = [{"id": f"block-{blocked}", "action": "block", "terms": [blocked]},
             {"id": f"protect-{named}", "action": "protect", "terms": [named], "label": "PERSON"}]
    for rule in rules:
        assert _admin(a, "POST", "/admin/v1/guardrails", rule).status_code == 201
    try:
        key_id, secret = _new_key(a)
        with pytest.raises(openai.BadRequestError):
            _client(a, secret).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"say {blocked}"}], max_tokens=2)
        _client(a, secret).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"{named} met {named} and {named}"}], max_tokens=2)
        total = _usage(a, key_id)
        assert (total["refused_policy"], total["protected_spans"], total["requests"]) == (1, 3, 1)
    finally:
        for rule in rules:
            _admin(a, "DELETE", f"/admin/v1/guardrails/{rule['id']}")


def test_guardrail_terms_and_patterns_are_never_shown_back(deployment) -> None:
    a, _ = deployment["replicas"]
    term = f"hushhush{secrets.token_hex(3)}"
    made = _admin(a, "POST", "/admin/v1/guardrails", {"id": "quiet", "action": "block", "terms": [term, "other"]})
    pattern = _admin(a, "POST", "/admin/v1/guardrails", {"id": "quiet-re", "action": "redact",
                                                         "pattern": f"{term}-[0-9]+"})
    try:
        listed = _admin(a, "GET", "/admin/v1/guardrails")
        for r in (made, pattern, listed):
            assert r.status_code in (200, 201) and term not in r.text
        rules = {rule["id"]: rule for rule in listed.json()["data"]}
        assert rules["quiet"]["terms_count"] == 2 and not rules["quiet"]["has_pattern"]
        assert rules["quiet-re"]["has_pattern"] and rules["quiet-re"]["terms_count"] == 0
    finally:
        _admin(a, "DELETE", "/admin/v1/guardrails/quiet")
        _admin(a, "DELETE", "/admin/v1/guardrails/quiet-re")


def test_noise_of_a_key_can_be_changed_and_is_audited(deployment) -> None:
    a, _ = deployment["replicas"]
    key_id, secret = _new_key(a)
    r = _admin(a, "PATCH", f"/admin/v1/keys/{key_id}/noise", {"noise_rho": 0.25})
    assert r.status_code == 200 and r.json()["noise_rho"] == 0.25
    me = httpx.get(a.url + "/v1/me", headers={"authorization": f"Bearer {secret}"}, timeout=30).json()
    assert me["noise_rho"] == 0.25
    assert _admin(a, "PATCH", f"/admin/v1/keys/{key_id}/noise", {"noise_rho": None}).json()["noise_rho"] is None
    assert _admin(a, "PATCH", f"/admin/v1/keys/{key_id}/noise", {"noise_rho": 1e9}).status_code == 400
    assert _admin(a, "PATCH", "/admin/v1/keys/nope/noise", {"noise_rho": 1}).status_code == 404
    tail = _admin(a, "GET", "/admin/v1/audit?n=50").json()["data"]
    assert any(line["event"] == "key.noise" and line.get("key_id") == key_id for line in tail)


def test_bad_since_is_a_400_and_the_cli_prints_the_same_figures(deployment) -> None:
    a, _ = deployment["replicas"]
    for bad in ("forever", "999d", "2999-01-01", "7w"):
        r = _admin(a, "GET", f"/admin/v1/usage?since={bad}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "since", r.text
    key_id, secret = _new_key(a)
    sent = _client(a, secret).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3)
    env = base_env(deployment["tmp"], VEIL_EDGE_URL=a.url, VEIL_ADMIN_KEY=ADMIN_KEY)
    run = lambda *args: subprocess.run([sys.executable, "-m", "veil_cli", "admin", "usage", *args],  # noqa: E731
                                       env=env, capture_output=True, text=True, timeout=60)
    out = run("--key", key_id, "--since", "7d", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["total"]["completion_tokens"] == sent.usage.completion_tokens
    table = run("--key", key_id)
    assert table.returncode == 0 and key_id in table.stdout and "(usage)" in table.stdout
    assert secret not in table.stdout + out.stdout


def test_without_redis_usage_lives_in_a_file_that_outlives_a_restart(deployment) -> None:
    home = deployment["tmp"] / "alone"
    home.mkdir()
    edge = deployment["start"](home, "", "alone")
    key_id, secret = _new_key(edge)
    sent = _client(edge, secret).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=3)
    edge.stop()  # a clean stop writes the last counts
    again = deployment["start"](home, "", "alone-again")
    total = _usage(again, key_id)
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"]) == \
        (1, sent.usage.prompt_tokens, sent.usage.completion_tokens)
    assert (home / "policy.usage.sqlite").is_file()
    # and nothing of it went to Redis
    assert not any(key_id.encode() in field for day in redis.Redis.from_url(REDIS_URL).scan_iter("veil:usage:*")
                   for field in redis.Redis.from_url(REDIS_URL).hkeys(day))
