"""The core as a real uvicorn server: enrolled edges only, sealed frames, limits, health, readiness, metrics."""

import secrets

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import x25519

from core_server.enrollment import allowed_edges_yaml
from tests.sealed_client import SealedSession
from veil import wire
from veil.identity import fingerprint, public_text, write_private_key
from veil_cli.processes import Server, base_env, free_port

pytestmark = pytest.mark.slow
EDGE_A, EDGE_B, STRANGER = (x25519.X25519PrivateKey.generate() for _ in range(3))


@pytest.fixture(scope="module")
def core(tiny_bundles, tmp_path_factory):
    _, _, bundle = tiny_bundles["llama"]
    port, metrics_port = free_port(), free_port()
    tmp = tmp_path_factory.mktemp("core")
    core_key = x25519.X25519PrivateKey.generate()
    write_private_key(tmp / "core.key", core_key)
    (tmp / "edges.yaml").write_text(allowed_edges_yaml([("edge-a", public_text(EDGE_A.public_key()), 2),
                                                        ("edge-b", public_text(EDGE_B.public_key()), 2)]))
    env = base_env(tmp, VEIL_CORE_PORT=str(port), VEIL_CORE_BUNDLE=str(bundle), VEIL_CORE_MAX_SESSIONS="3",
                   VEIL_CORE_MAX_TOKENS_PER_SESSION="64", VEIL_CORE_IDENTITY_KEY_FILE=str(tmp / "core.key"),
                   VEIL_CORE_ALLOWED_EDGES=str(tmp / "edges.yaml"), VEIL_CORE_METRICS_PORT=str(metrics_port))
    server = Server("core", env, port, tmp / "core.log").wait_ready()
    server.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    server.fingerprint = fingerprint(core_key.public_key())  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_health_readiness_and_the_public_info(core: Server) -> None:
    assert httpx.get(core.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(core.url + "/readyz").status_code == 200
    info = httpx.get(core.url + "/v1/info").json()
    assert info["hidden_size"] == 64 and info["max_tokens_per_session"] == 64 and len(info["bundle_id"]) == 32
    assert info["identity"]["fingerprint"] == core.fingerprint and info["protocol"] == "veil/1"
    assert "max_sessions" not in info and "device" not in info


def test_a_sealed_step_returns_the_wanted_rows_and_close_frees_the_session(core: Server) -> None:
    s = SealedSession(core.url, EDGE_A)
    assert s.opened.status_code == 200
    res = s.step(0, torch.randn(5, 64), want=[0, -1])
    assert res.length == 5 and res.hidden.shape == (2, 64)
    assert s.step(5, torch.randn(1, 64)).length == 6
    assert s.close().status_code == 204
    gone = s.close()
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "session_unknown"


def test_a_close_after_a_step_that_never_arrived_still_frees_the_session(core: Server) -> None:
    # the edge sealed a step, then its client went away before the step reached the core: the close that
    # follows carries a later seq than the core expects, and must still end the session (not wait for expiry)
    s = SealedSession(core.url, EDGE_A)
    s.step(0, torch.randn(3, 64))
    s.frame(3, torch.randn(1, 64))  # sealed, never sent
    assert s.close().status_code == 204
    gone = s.close()
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "session_unknown"


@pytest.mark.parametrize("method,path", [("POST", "/v1/sessions"), ("POST", "/v1/sessions/" + "ab" * 16 + "/step"),
                                         ("DELETE", "/v1/sessions/" + "ab" * 16), ("POST", "/v1/step")])
def test_raw_http_gets_401_on_every_session_route(core: Server, method: str, path: str) -> None:
    for body in (b"", b"\x01" + secrets.token_bytes(200), wire.encode_request(
            wire.StepRequest("ab" * 16, 0, torch.randn(2, 64), bundle_id="0" * 32))):
        r = httpx.request(method, core.url + path, content=body)
        assert r.status_code in (401, 404), (path, r.status_code)
        if path != "/v1/step":  # the old plaintext route is simply gone
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_an_edge_with_an_unknown_key_is_refused(core: Server) -> None:
    s = SealedSession(core.url, STRANGER)
    assert s.opened.status_code == 401 and s.opened.json()["error"]["code"] == "edge_not_admitted"
    pq = SealedSession(core.url, STRANGER, post_quantum=True)
    assert pq.opened.status_code == 401


def test_a_replayed_hello_is_refused(core: Server) -> None:
    s = SealedSession(core.url, EDGE_A)
    again = httpx.post(core.url + "/v1/sessions", content=s.hello_body)
    assert again.status_code == 401 and again.json()["error"]["code"] == "hello_replayed"
    s.close()


def test_edge_a_cannot_touch_edge_b_s_session(core: Server) -> None:
    b = SealedSession(core.url, EDGE_B)
    b.step(0, torch.randn(3, 64))
    a = SealedSession(core.url, EDGE_A)
    _, forged = a.frame(3, torch.randn(1, 64))
    stepped = a.post(forged, sid=b.sid)  # A's keys do not open B's channel
    assert stepped.status_code == 401 and stepped.json()["error"]["code"] == "frame_rejected"
    closed = httpx.request("DELETE", f"{core.url}/v1/sessions/{b.sid}", content=a.channel.seal("close", b""))
    assert closed.status_code == 401
    takeover = SealedSession(core.url, EDGE_A, sid=b.sid, resume=True)  # nor re-key it
    assert takeover.opened.status_code == 409 and takeover.opened.json()["error"]["code"] == "session_exists"
    assert b.step(3, torch.randn(1, 64)).length == 4, "B's session went on untouched"
    a.channel.sent = 0  # none of A's frames reached A's own session
    assert a.close().status_code == 204 and b.close().status_code == 204


def test_one_edge_at_its_quota_leaves_room_for_another(core: Server) -> None:
    mine = [SealedSession(core.url, EDGE_A) for _ in range(2)]
    assert [s.opened.status_code for s in mine] == [200, 200], mine[-1].opened.text
    third = SealedSession(core.url, EDGE_A)
    assert third.opened.status_code == 429 and third.opened.json()["error"]["code"] == "edge_session_quota"
    assert third.opened.headers["retry-after"] == "1"
    other = SealedSession(core.url, EDGE_B)
    assert other.opened.status_code == 200
    for s in (*mine, other):
        s.close()


def test_bad_frames_are_refused_and_leave_the_session_as_it_was(core: Server) -> None:
    torch.manual_seed(0)
    prompt, nxt = torch.randn(4, 64), torch.randn(1, 64)
    ref = SealedSession(core.url, EDGE_A)
    ref.step(0, prompt)
    want = ref.step(4, nxt).hidden
    ref.close()

    s = SealedSession(core.url, EDGE_A)
    seq0, first = s.frame(0, prompt)
    answer = s.post(first)
    s.result(answer, seq0)
    replay = s.post(first)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "frame_out_of_order"
    seq1, good = s.frame(4, nxt)
    _, later = s.frame(4, nxt)
    ahead = s.post(later)  # seq 2 before seq 1: reordered
    assert ahead.status_code == 409
    flipped = bytearray(good)
    flipped[20] ^= 1
    real = s.channel.bundle_id
    s.channel.bundle_id = "0" * 32  # sealed for another bundle (the associated data binds it)
    misbound = s.channel.seal("step", wire.encode_request(wire.StepRequest(s.sid, 4, nxt, bundle_id=real)), seq=seq1)
    s.channel.bundle_id = real
    spliced = good[:8] + later[8:]  # seq 1 on seq 2's ciphertext
    for bad in (bytes(flipped), good[:-5], good[:10], b"", misbound, spliced, answer.content):  # last: misdirected
        r = s.post(bad)
        assert r.status_code == 401 and r.json()["error"]["code"] == "frame_rejected"
    other_bundle = SealedSession(core.url, EDGE_A, sid=s.sid, resume=True, bundle_id="0" * 32)
    assert other_bundle.opened.status_code == 409 and other_bundle.opened.json()["error"]["code"] == "bundle_mismatch"
    assert s.result(s.post(good), seq1).hidden.equal(want), "the next legitimate step is exact"
    s.channel.sent = 2  # the refused seq 2 was never accepted: the core still waits for it
    assert s.close().status_code == 204


def test_limits_are_clear_4xx_inside_the_channel(core: Server) -> None:
    s = SealedSession(core.url, EDGE_A)
    too_long = s.post(s.frame(0, torch.randn(65, 64))[1])
    assert too_long.status_code == 413 and "max_tokens_per_session is 64" in too_long.json()["error"]["message"]
    rows = s.post(s.frame(0, torch.randn(1, 64), want=[0] * 65)[1])  # 22 bytes of want, 65 rows of answer
    assert rows.status_code == 413 and rows.json()["error"]["code"] == "result_rows_limit"
    lost = s.post(s.frame(3, torch.randn(1, 64))[1])
    assert lost.status_code == 404 and lost.json()["error"]["code"] == "session_not_found"
    wide = s.post(s.frame(0, torch.randn(1, 8))[1])
    assert wide.status_code == 400 and wide.json()["error"]["code"] == "dim_mismatch"
    other = s.post(s.frame(0, torch.randn(1, 64), bundle_id="0" * 32)[1])
    assert other.status_code == 409 and other.json()["error"]["code"] == "bundle_mismatch"
    assert s.step(0, torch.randn(2, 64)).length == 2
    assert s.post(s.frame(9, torch.randn(1, 64))[1]).status_code == 409
    s.close()


def test_metrics_live_on_their_own_address(core: Server) -> None:
    text = httpx.get(core.metrics_url).text
    for name in ("veil_core_queued_steps", "veil_core_active_sessions", "veil_core_step_seconds_bucket",
                 'veil_core_tokens_total{kind="prefill"}', "veil_core_batch_tokens_bucket", "veil_core_ready 1.0",
                 'veil_core_handshakes_total{result="opened"}', 'veil_core_frames_refused_total{reason="frame_rejected"}'):
        assert name in text
    assert httpx.get(core.url + "/metrics").status_code == 404


def test_unknown_route_is_openai_shaped_404(core: Server) -> None:
    r = httpx.get(core.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
