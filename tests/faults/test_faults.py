"""Faults under real servers: Redis down or slow behind the limiter, and the core killed in the middle of a stream.

Redis sits behind a FaultyLink (tests/faults/tcp_fault.py) so a test can cut it, slow it or make it silent
while the edges keep running; the core is a real process that is sent SIGKILL mid-stream.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.faults.tcp_fault import FaultyLink
from veil_cli.enroll import enroll_locally
from veil_cli.processes import Server, base_env, free_port, ready_all

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
ADMIN_KEY = "sk-veil-faultadmin-" + secrets.token_urlsafe(32)
PASSPHRASE = "faults " + secrets.token_hex(8)
CANARY = "QUOKKA-" + secrets.token_hex(4)
BOUND_S = 5.0  # a Redis fault must be answered within this: 1 s socket timeout, one retry, slack for 2 cores


@pytest.fixture(scope="module")
def rig(tiny_bundles, key_file: Path, tmp_path_factory: pytest.TempPathFactory, rdb: redis.Redis):
    """A core; an edge failing closed and one failing open, both on Redis through one FaultyLink."""
    _, edge_bundle, core_bundle = tiny_bundles["llama"]
    tmp = tmp_path_factory.mktemp("faults")
    link = FaultyLink(6379)
    wiring = enroll_locally(tmp / "core.key", tmp / "edge.key", tmp / "allowed_edges.yaml", 16)
    core_port = free_port()
    core_env = base_env(tmp, VEIL_CORE_PORT=str(core_port), VEIL_CORE_BUNDLE=str(core_bundle), **wiring)
    core = Server("core", core_env, core_port, tmp / "core.log")
    shared = dict(VEIL_AUTH_ENABLED="true", VEIL_POLICY_PASSPHRASE=PASSPHRASE, VEIL_ADMIN_KEY=ADMIN_KEY,
                  VEIL_POLICY_STORE=str(tmp / "policy.store"), VEIL_POLICY_AUDIT_LOG=str(tmp / "audit.log"),
                  VEIL_REDIS_URL=f"redis://127.0.0.1:{link.port}/0", VEIL_BUNDLE_EDGE_DIR=str(edge_bundle),
                  VEIL_BUNDLE_KEY_FILE=str(key_file), VEIL_MODEL_NAME=MODEL, VEIL_EDGE_CORE_URL=core.url, **wiring)
    edges = {}
    for name, fail_open in (("closed", "false"), ("open", "true")):
        port = free_port()
        edges[name] = Server("edge", base_env(tmp, VEIL_EDGE_PORT=str(port), VEIL_REDIS_FAIL_OPEN=fail_open, **shared),
                             port, tmp / f"edge-{name}.log")
    ready_all(core, *edges.values())
    rig = {"link": link, "core": core, "core_env": core_env, "tmp": tmp, "redis": rdb, **edges}
    yield rig
    for server in (*edges.values(), rig["core"]):
        server.stop()
    link.down()


def _key(edge: Server, **limits) -> tuple[str, str]:
    r = httpx.post(edge.url + "/admin/v1/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30,
                   json={"name": "faults", "scopes": ["generate"], **limits})
    assert r.status_code == 201, r.text
    return r.json()["key"]["id"], r.json()["secret"]


def _chat(edge: Server, secret: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {CANARY}"}], "max_tokens": 3, **extra}
    return httpx.post(edge.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"},
                      timeout=60)


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def _metric(edge: Server, name: str) -> float:
    text = httpx.get(edge.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_redis_down_fails_closed_with_a_quick_503_and_open_when_configured(rig) -> None:
    closed, opened = rig["closed"], rig["open"]
    _, secret = _key(closed, rpm=100)
    assert _chat(closed, secret).status_code == 200
    rig["link"].down()
    try:
        for stream in (False, True):
            r, took = _timed(lambda: _chat(closed, secret, stream=stream))
            assert r.status_code == 503 and took < BOUND_S, (r.status_code, took)
            assert r.headers["content-type"].startswith("application/json")  # an error status, not a broken stream
            assert r.json()["error"]["code"] == "rate_limiter_unavailable"
        r, took = _timed(lambda: _chat(opened, secret))
        assert r.status_code == 200 and took < 2 * BOUND_S
        assert "x-ratelimit-remaining-requests" not in r.headers  # unknown while Redis is away
        assert closed.running() and opened.running()
    finally:
        rig["link"].up()
    deadline = time.monotonic() + 30
    while (r := _chat(closed, secret)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)  # pooled connections to the dead link are dropped on their first use
    assert r.status_code == 200
    assert _metric(closed, "veil_edge_sessions_held") == 0  # refused at admission: nothing held


@pytest.mark.parametrize("fault", ["slow", "silent"])
def test_a_slow_or_silent_redis_is_a_bounded_503_never_a_hang(rig, fault: str) -> None:
    edge = rig["closed"]
    _, secret = _key(edge)
    if fault == "slow":
        rig["link"].delay_s = 3.0  # every answer arrives 3 s late: past the limiter's 1 s timeout
    else:
        rig["link"].silent = True
    try:
        r, took = _timed(lambda: _chat(edge, secret))
        assert r.status_code == 503 and took < BOUND_S, (r.status_code, took)
        assert r.json()["error"]["code"] == "rate_limiter_unavailable"
        assert httpx.get(edge.url + "/healthz", timeout=5).status_code == 200  # the event loop is not stalled
    finally:
        rig["link"].delay_s, rig["link"].silent = 0.0, False
    deadline = time.monotonic() + 30
    while (r := _chat(edge, secret)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200


def _sse(lines) -> list[dict | str]:
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_core_killed_mid_stream_gives_a_clean_error_event_settles_and_leaks_nothing(rig) -> None:
    edge = rig["closed"]
    key_id, secret = _key(edge, tpm=100_000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"go {CANARY}"}], "stream": True,
            "max_tokens": 400, "logit_bias": {"2": -100}}  # no EOS: it would run all 400 tokens
    events: list[dict | str] = []
    with httpx.stream("POST", edge.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {secret}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
            if len(events) == 4:
                rig["core"].proc.kill()  # SIGKILL: no goodbye to the edge
                break
        rest, took = _timed(lambda: _sse(lines))
    events += rest
    assert took < 60 and events[-1] == "[DONE]"
    error = events[-2]
    assert isinstance(error, dict) and set(error) == {"error"}
    assert error["error"]["type"] == "server_error" and error["error"]["code"]
    assert CANARY not in json.dumps(error)
    streamed = sum(1 for e in events if isinstance(e, dict) and e.get("choices") and
                   e["choices"][0]["delta"].get("content"))
    # the reservation (prompt + 400) was settled to what was really used
    used = int(rig["redis"].get(f"veil:rl:{{{key_id}}}:sum") or 0)
    assert 0 < used < 100 and streamed < 400
    assert _metric(edge, "veil_edge_sessions_held") == 0
    r = _chat(edge, secret)  # no core at all now: a clean 503, the edge itself still fine
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    for log in (edge.log(), rig["core"].log()):
        assert CANARY not in log and secret not in log and "Traceback" not in log
    # bring the core back for whatever runs next in this module
    rig["core"] = Server("core", rig["core_env"], rig["core"].port, rig["tmp"] / "core-2.log").wait_ready()
