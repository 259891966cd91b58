"""The policy plane wired into real edges: two replicas sharing a policy store, Redis and an audit log."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, base_env, free_port, ready_all

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
PASSPHRASE = "correct horse battery staple " + secrets.token_hex(4)
ADMIN_KEY = "sk-veil-adminboot-" + secrets.token_urlsafe(32)
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def cluster(tiny_bundles, key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """One core and two auth-enabled edge replicas sharing store, audit log and Redis."""
    _, edge_bundle, core_bundle = tiny_bundles["llama"]
    tmp = tmp_path_factory.mktemp("policy-cluster")
    core_port = free_port()
    wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 16)  # both replicas: one edge
    core = Server("core", base_env(tmp, VEIL_CORE_PORT=str(core_port), VEIL_CORE_BUNDLE=str(core_bundle), **wiring),
                  core_port, tmp / "core.log")
    shared = dict(VEIL_AUTH_ENABLED="true", VEIL_POLICY_PASSPHRASE=PASSPHRASE,
                  VEIL_POLICY_STORE=str(tmp / "policy.store"), VEIL_POLICY_AUDIT_LOG=str(tmp / "audit.log"),
                  VEIL_ADMIN_KEY=ADMIN_KEY, VEIL_REDIS_URL=REDIS_URL, VEIL_BUNDLE_EDGE_DIR=str(edge_bundle),
                  VEIL_BUNDLE_KEY_FILE=str(key_file), VEIL_MODEL_NAME=MODEL, VEIL_EDGE_CORE_URL=core.url, **wiring)
    edges = []
    try:
        for i in range(2):
            port = free_port()
            edges.append(Server("edge", base_env(tmp, VEIL_EDGE_PORT=str(port), **shared), port, tmp / f"edge{i}.log"))
        ready_all(core, *edges)
        yield {"core": core, "edges": edges, "tmp": tmp, "env": shared}
    finally:
        for s in edges + [core]:
            s.stop()


def _admin(edge: Server, method: str, path: str, body: dict | None = None, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.request(method, edge.url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def _new_key(edge: Server, **body) -> tuple[str, str]:
    r = _admin(edge, "POST", "/admin/v1/keys", {"name": "t", "scopes": ["generate", "read"], **body})
    assert r.status_code == 201, r.text
    return r.json()["key"]["id"], r.json()["secret"]


def _metrics(edge: Server) -> str:
    r = httpx.get(edge.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.text


def _client(edge: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=edge.url + "/v1", api_key=key, max_retries=0)


def _chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=kw.pop("max_tokens", 3), **kw)


def test_openai_client_with_valid_wrong_and_underscoped_keys(cluster) -> None:
    edge = cluster["edges"][0]
    _, secret = _new_key(edge)
    ok = _chat(_client(edge, secret))
    assert ok.choices[0].message.content is not None
    assert [m.id for m in _client(edge, secret).models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(edge, secret + "x"))
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(edge, "sk-veil-nothere-" + "a" * 40))
    _, reader = _new_key(edge, scopes=["read"])
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_client(edge, reader))
    r = httpx.post(edge.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "missing_api_key"
    assert _admin(edge, "GET", "/admin/v1/keys", key=secret).status_code == 403


def test_request_limit_is_shared_by_replicas_and_429_carries_headers(cluster) -> None:
    a, b = cluster["edges"]
    _, secret = _new_key(a, rpm=4)
    raw = _client(a, secret).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "4" and raw.headers["x-ratelimit-remaining-requests"] == "3"
    _chat(_client(b, secret))
    _chat(_client(a, secret))
    _chat(_client(b, secret))
    with pytest.raises(openai.RateLimitError) as exc:
        _chat(_client(a, secret))
    headers = exc.value.response.headers
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        _chat(_client(b, secret))


def test_a_fixed_request_id_neither_bypasses_the_limit_nor_is_trusted(cluster) -> None:
    """The limiter's entries are ids the edge makes: a client repeating one x-request-id used to replace
    its earlier reservation and get every request through. The id is still echoed for correlation."""
    a, b = cluster["edges"]
    _, secret = _new_key(a, rpm=2)
    fixed = {"x-request-id": "same-id-every-time"}
    for edge in (a, b):
        raw = _client(edge, secret).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_headers=fixed)
        assert raw.headers["x-request-id"] == "same-id-every-time"
    for edge in (a, b):
        with pytest.raises(openai.RateLimitError):
            _client(edge, secret).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_headers=fixed)


def test_token_limit_reserves_max_tokens_then_counts_actual_usage(cluster) -> None:
    edge = cluster["edges"][0]
    eos = 2  # SmolLM2's <|im_end|>: a +100 bias ends each reply after one token
    _, secret = _new_key(edge, tpm=260)
    client = _client(edge, secret)
    first = _chat(client, max_tokens=150, logit_bias={str(eos): 100})
    assert first.usage.completion_tokens == 1
    # a second 150-token reservation fits only because the first was corrected to its actual usage
    second = _chat(client, max_tokens=150, logit_bias={str(eos): 100})
    assert second.usage.completion_tokens == 1
    with pytest.raises(openai.RateLimitError) as exc:
        _chat(client, max_tokens=200)
    assert "tokens" in exc.value.message


def test_malformed_over_context_and_refused_requests_count_toward_rpm(cluster) -> None:
    """They used to cost nothing: the limiter was consulted only after parsing and tokenizing."""
    edge = cluster["edges"][0]
    _, secret = _new_key(edge, rpm=3)
    auth = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    r = httpx.post(edge.url + "/v1/chat/completions", content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and r.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(_client(edge, secret), max_tokens=100_000)
    assert exc.value.code == "context_length_exceeded"
    _chat(_client(edge, secret))
    with pytest.raises(openai.RateLimitError) as limited:
        _chat(_client(edge, secret))
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def _long_stream(client: openai.OpenAI):
    """A stream that holds its core session for a few seconds: EOS is forbidden, so it runs to max_tokens."""
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
                                          max_tokens=400, logit_bias={"2": -100})


def _until_ok(fn, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except (openai.RateLimitError, openai.InternalServerError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_key_over_its_concurrency_cap_gets_429_until_its_stream_ends(cluster) -> None:
    edge = cluster["edges"][0]
    key_id, secret = _new_key(edge, max_concurrent=1)
    client = _client(edge, secret)
    stream = _long_stream(client)
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    with pytest.raises(openai.RateLimitError) as exc:
        _chat(client)
    assert exc.value.code == "concurrency_limit_exceeded" and exc.value.response.headers["retry-after"] == "1"
    _chat(_client(edge, _new_key(edge)[1]))  # other keys are not held back
    stream.close()  # the edge frees the session when it sees the client leave
    _until_ok(lambda: _chat(client))
    assert 'veil_edge_rate_limited_total{limit="concurrency"}' in _metrics(edge)
    assert _admin(edge, "PATCH", f"/admin/v1/keys/{key_id}/limits", {"max_concurrent": None}).json()[
        "max_concurrent"] is None


@pytest.fixture(scope="module")
def one_session_edge(cluster):
    """A third replica whose quota at the core is a single session, with a short admission wait."""
    port = free_port()
    edge = Server("edge", base_env(cluster["tmp"], VEIL_EDGE_PORT=str(port), VEIL_EDGE_MAX_SESSIONS="1",
                                   VEIL_EDGE_ADMISSION_WAIT_SECONDS="0.5", **cluster["env"]),
                  port, cluster["tmp"] / "edge-one-session.log").wait_ready()
    yield edge
    edge.stop()


def test_when_every_session_stays_busy_the_next_request_gets_503_and_all_are_freed(one_session_edge) -> None:
    edge = one_session_edge
    a, b = _client(edge, _new_key(edge)[1]), _client(edge, _new_key(edge)[1])
    stream = _long_stream(a)
    next(iter(stream))
    with pytest.raises(openai.InternalServerError) as exc:
        _chat(b)
    assert exc.value.status_code == 503 and exc.value.code == "server_busy"
    assert exc.value.response.headers["retry-after"] == "1"
    served: list = []
    waiter = threading.Thread(target=lambda: served.append(_until_ok(lambda: _chat(b), timeout_s=180)))
    waiter.start()
    for _ in stream:  # drain: the session frees at the end, and the waiting client gets it
        pass
    waiter.join(timeout=200)
    assert served and served[0].choices[0].message.content is not None
    metrics = _metrics(edge)
    assert float(re.search(r"^veil_edge_sessions_busy_total (\S+)$", metrics, re.M).group(1)) >= 1
    assert "veil_edge_sessions_held 0.0" in metrics and "veil_edge_sessions_waiting 0.0" in metrics


def test_revoking_through_one_replica_is_401_on_the_other(cluster) -> None:
    a, b = cluster["edges"]
    key_id, secret = _new_key(a)
    _chat(_client(b, secret))
    assert _admin(a, "POST", f"/admin/v1/keys/{key_id}/revoke").status_code == 200
    with pytest.raises(openai.AuthenticationError) as exc:
        _chat(_client(b, secret))
    assert "revoked" in exc.value.message


def test_guardrail_blocks_before_the_core_and_names_only_the_rule(cluster) -> None:
    a, b = cluster["edges"]
    _, secret = _new_key(a)
    r = _admin(a, "POST", "/admin/v1/guardrails", {"id": "codename", "action": "block",
                                                   "pattern": r"(?i)\bproject-x\b"})
    assert r.status_code == 201, r.text
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            _client(b, secret).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "status of Project-X?"}], max_tokens=3)
        assert exc.value.code == "policy_violation" and "codename" in exc.value.message
        assert "project-x" not in exc.value.response.text.lower()
        metrics = _metrics(b)
        assert 'veil_edge_policy_blocks_total{rule="codename"}' in metrics
    finally:
        assert _admin(a, "DELETE", "/admin/v1/guardrails/codename").status_code == 204


def _veil_admin(cluster, *args: str, key: str = ADMIN_KEY) -> subprocess.CompletedProcess:
    env = base_env(cluster["tmp"], VEIL_EDGE_URL=cluster["edges"][0].url, VEIL_ADMIN_KEY=key)
    return subprocess.run([sys.executable, "-m", "veil_cli", "admin", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_cli_manages_keys_limits_guardrails_and_audit(cluster) -> None:
    out = _veil_admin(cluster, "keys", "create", "--name", "ci-bot", "--scopes", "generate,read", "--rpm", "60",
                      "--tpm", "20000")
    assert out.returncode == 0, out.stderr
    secret = [line for line in out.stdout.splitlines() if line.startswith("sk-veil-")]
    assert len(secret) == 1 and secret[0].strip() == secret[0]
    listed = json.loads(_veil_admin(cluster, "--json", "keys", "list").stdout)["data"]
    key = next(k for k in listed if k["name"] == "ci-bot")
    assert key["rpm"] == 60 and "hash" not in key
    assert _veil_admin(cluster, "limits", "set", key["id"], "--rpm", "120").returncode == 0
    assert json.loads(_veil_admin(cluster, "--json", "keys", "show", key["id"]).stdout)["rpm"] == 120
    rotated = _veil_admin(cluster, "keys", "rotate", key["id"]).stdout
    assert secret[0] not in rotated and "sk-veil-" + key["id"] in rotated
    assert _veil_admin(cluster, "guardrails", "add", "--pattern", r"(?i)\bproject-y\b", "--action", "block",
                       "--id", "py").returncode == 0
    assert "py" in _veil_admin(cluster, "guardrails", "list").stdout
    assert _veil_admin(cluster, "guardrails", "remove", "py").returncode == 0
    assert _veil_admin(cluster, "keys", "revoke", key["id"]).returncode == 0
    tail = _veil_admin(cluster, "--json", "audit", "tail", "-n", "50")
    events = [line["event"] for line in json.loads(tail.stdout)["data"]]
    assert {"key.create", "key.limits", "key.rotate", "guardrail.add", "key.revoke"} <= set(events)
    verify = _veil_admin(cluster, "audit", "verify")
    assert verify.returncode == 0 and "ok" in verify.stdout
    assert _veil_admin(cluster, "keys", "list", key="sk-veil-wrong-" + "b" * 40).returncode != 0
    exported = json.loads(_veil_admin(cluster, "--json", "policy", "export").stdout)
    assert exported["version"] >= 1 and "keys" in exported["payload"]


def test_cli_manages_protect_rules_and_the_edge_applies_them(cluster) -> None:
    email = "kenji.takahashi@northwind.com"
    added = _veil_admin(cluster, "guardrails", "add", "--id", "pii", "--action", "protect", "--entities",
                        "EMAIL_ADDRESS,CREDIT_CARD")
    assert added.returncode == 0 and "protect (placeholder)" in added.stdout, added.stderr
    assert _veil_admin(cluster, "guardrails", "add", "--id", "crm", "--action", "protect", "--terms", "Kenji Takahashi",
                       "--label", "PERSON", "--protection", "noise").returncode == 0
    listed = _veil_admin(cluster, "guardrails", "list").stdout
    assert "entities EMAIL_ADDRESS,CREDIT_CARD" in listed and "1 terms -> <PERSON_n>" in listed
    assert "Kenji" not in listed, "the list never echoes the protected values"
    bad = _veil_admin(cluster, "guardrails", "add", "--action", "protect", "--entities", "SHOE_SIZE")
    assert bad.returncode != 0 and "unknown entity 'SHOE_SIZE'" in bad.stderr
    _, secret = _new_key(cluster["edges"][1])
    reply = _client(cluster["edges"][1], secret).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Mail Kenji Takahashi at {email}"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    events = json.loads(_veil_admin(cluster, "--json", "audit", "tail", "-n", "20").stdout)["data"]
    protect = [e for e in events if e["event"] == "policy.protect"]
    assert protect and protect[-1]["rules"] == "crm,pii" and protect[-1]["spans"] == 2
    metrics = _metrics(cluster["edges"][1])
    assert 'veil_edge_protected_spans_total{label="EMAIL",protection="placeholder"} 1.0' in metrics
    assert 'veil_edge_protected_spans_total{label="PERSON",protection="noise"} 1.0' in metrics
    everything = (Path(cluster["tmp"]) / "audit.log").read_text() + metrics + "".join(
        s.log() for s in cluster["edges"])
    assert email not in everything and "Takahashi" not in everything
    for rule in ("pii", "crm"):
        assert _veil_admin(cluster, "guardrails", "remove", rule).returncode == 0


def _audit_lines(cluster, ready, timeout_s: float = 10.0) -> list[dict]:
    """The audit log's lines once `ready(lines)` holds: the edge writes them from a background thread."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(x) for x in (cluster["tmp"] / "audit.log").read_text().splitlines()]
        if ready(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_audit_records_failures_and_no_secret_reaches_logs_metrics_or_errors(cluster) -> None:
    a, b = cluster["edges"]
    key_id, secret = _new_key(a, rpm=1)
    _chat(_client(a, secret))
    bodies = []
    for bad in (lambda: _chat(_client(a, secret)), lambda: _chat(_client(b, secret + "zz"))):
        with pytest.raises(openai.APIStatusError) as exc:
            bad()
        bodies.append(exc.value.response.text)
    lines = _audit_lines(cluster, lambda ls: any(x["event"] == "ratelimit.reject" and x["actor"] == key_id for x in ls)
                         and any(x["event"] == "auth.failure" for x in ls))
    assert any(x["event"] == "ratelimit.reject" and x["actor"] == key_id for x in lines)
    assert any(x["event"] == "auth.failure" for x in lines)
    everything = "".join(s.log() for s in cluster["edges"] + [cluster["core"]]) + "".join(bodies)
    everything += _metrics(a) + (cluster["tmp"] / "audit.log").read_text()
    secret_part = secret[len(f"sk-veil-{key_id}-"):]  # urlsafe base64 may itself contain '-'
    assert len(secret_part) >= 40
    for secret_text in (secret, secret_part, ADMIN_KEY, PASSPHRASE):
        assert secret_text not in everything
    assert key_id not in _metrics(a)  # no series is labelled by key id


def test_metrics_need_the_metrics_scope_and_refusals_by_scope_are_counted_and_audited(cluster) -> None:
    a = cluster["edges"][0]
    assert httpx.get(a.url + "/metrics").status_code == 401
    reader_id, reader = _new_key(a, scopes=["read"])
    assert httpx.get(a.url + "/metrics", headers={"authorization": f"Bearer {reader}"}).status_code == 403
    _, scraper = _new_key(a, scopes=["metrics"])
    scraped = httpx.get(a.url + "/metrics", headers={"authorization": f"Bearer {scraper}"})
    assert scraped.status_code == 200 and 'veil_edge_permission_denied_total{scope="metrics"}' in scraped.text
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_client(a, reader))
    assert [m.id for m in _client(a, ADMIN_KEY).models.list()] == [MODEL]  # admin implies read
    lines = _audit_lines(cluster, lambda ls: len({x.get("scope") for x in ls if x["event"] == "auth.denied"
                                                  and x.get("actor") == reader_id}) == 2)
    denied = [x for x in lines if x["event"] == "auth.denied" and x["actor"] == reader_id]
    assert {x["scope"] for x in denied} == {"metrics", "generate"}


def _start_edge(cluster, tmp: Path, **extra: str) -> subprocess.Popen:
    env = base_env(tmp, VEIL_EDGE_PORT=str(free_port()), **{**cluster["env"], **extra})
    return subprocess.Popen([sys.executable, "-m", "veil_cli", "edge"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_bad_passphrase_and_public_address_without_auth_refuse_to_start(cluster, tmp_path: Path) -> None:
    wrong = _start_edge(cluster, tmp_path, VEIL_POLICY_PASSPHRASE="not the passphrase")
    out, _ = wrong.communicate(timeout=120)
    assert wrong.returncode != 0 and "wrong passphrase or tampered" in out and "Traceback" not in out
    public = _start_edge(cluster, tmp_path, VEIL_AUTH_ENABLED="false", VEIL_EDGE_HOST="0.0.0.0")
    out, _ = public.communicate(timeout=120)
    assert public.returncode != 0 and "refusing to serve without authentication" in out


def test_bootstrap_admin_key_is_printed_once(cluster, tmp_path: Path) -> None:
    env = {**cluster["env"], "VEIL_ADMIN_KEY": "", "VEIL_POLICY_STORE": str(tmp_path / "fresh.store"),
           "VEIL_POLICY_AUDIT_LOG": str(tmp_path / "audit.log")}
    port = free_port()
    first = Server("edge", base_env(tmp_path, VEIL_EDGE_PORT=str(port), **env), port, tmp_path / "e1.log")
    try:
        first.wait_ready()
        printed = [line.strip() for line in first.log().splitlines() if line.strip().startswith("sk-veil-")]
        assert len(printed) == 1
        assert _admin(first, "GET", "/admin/v1/keys", key=printed[0]).status_code == 200
    finally:
        first.stop()
    second = Server("edge", base_env(tmp_path, VEIL_EDGE_PORT=str(port), **env), port, tmp_path / "e2.log")
    try:
        second.wait_ready()
        assert "sk-veil-" not in second.log()
    finally:
        second.stop()


def test_jwt_bearer_tokens_work_through_the_edge(cluster, tmp_path: Path) -> None:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "idp.pem"
    pem.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    port = free_port()
    env = {**cluster["env"], "VEIL_AUTH_JWT_ISSUER": "https://idp.test", "VEIL_AUTH_JWT_AUDIENCE": "veil",
           "VEIL_AUTH_JWT_PUBLIC_KEY_FILE": str(pem), "VEIL_AUTH_JWT_DEFAULT_RPM": "100"}
    edge = Server("edge", base_env(tmp_path, VEIL_EDGE_PORT=str(port), **env), port, tmp_path / "jwt-edge.log")

    def token(scope: str, exp_in: int = 300) -> str:
        now = int(time.time())
        return jwt.encode({"iss": "https://idp.test", "aud": "veil", "sub": "alice", "scope": scope,
                           "iat": now, "exp": now + exp_in}, private, algorithm="RS256")

    try:
        edge.wait_ready()
        ok = _chat(_client(edge, token("generate read")))
        assert ok.choices[0].finish_reason in ("stop", "length")
        me = httpx.get(edge.url + "/v1/me", headers={"authorization": f"Bearer {token('read')}"}).json()
        assert me["key_id"] == "jwt:alice" and me["kind"] == "jwt" and me["rpm"] == 100
        with pytest.raises(openai.PermissionDeniedError):
            _chat(_client(edge, token("read")))
        with pytest.raises(openai.AuthenticationError) as exc:
            _chat(_client(edge, token("generate", exp_in=-3600)))
        assert "expired" in exc.value.message
        assert token("generate read") not in edge.log()
    finally:
        edge.stop()
