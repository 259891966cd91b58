"""The core as a real uvicorn server: step API, limits, session close, health, readiness, metrics."""


import httpx
import pytest
import torch

from veil import wire
from veil.wire import StepRequest
from veil_cli.processes import Server, base_env, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def core(tiny_bundles, tmp_path_factory):
    _, _, bundle = tiny_bundles["llama"]
    port = free_port()
    tmp = tmp_path_factory.mktemp("core")
    env = base_env(tmp, VEIL_CORE_PORT=str(port), VEIL_CORE_BUNDLE=str(bundle), VEIL_CORE_MAX_SESSIONS="2",
                   VEIL_CORE_MAX_TOKENS_PER_SESSION="64")
    server = Server("core", env, port, tmp / "core.log").wait_ready()
    yield server
    server.stop()


def _step(core: Server, sid: str, offset: int, rows: int, **kw) -> httpx.Response:
    kw.setdefault("bundle_id", httpx.get(core.url + "/v1/info").json()["bundle_id"])
    body = wire.encode_request(StepRequest(sid, offset, torch.randn(rows, 64), **kw))
    return httpx.post(core.url + "/v1/step", content=body, headers={"content-type": wire.CONTENT_TYPE})


def test_health_readiness_and_info(core: Server) -> None:
    assert httpx.get(core.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(core.url + "/readyz").status_code == 200
    info = httpx.get(core.url + "/v1/info").json()
    assert info["hidden_size"] == 64 and info["max_tokens_per_session"] == 64 and len(info["bundle_id"]) == 32


def test_step_returns_the_wanted_rows_and_close_frees_the_session(core: Server) -> None:
    sid = "a1" * 16
    r = _step(core, sid, 0, 5, want=[0, -1])
    assert r.status_code == 200 and r.headers["content-type"] == wire.CONTENT_TYPE
    res = wire.decode_result(r.content)
    assert res.length == 5 and res.hidden.shape == (2, 64)
    res2 = wire.decode_result(_step(core, sid, 5, 1).content)
    assert res2.length == 6 and res2.hidden.shape == (1, 64)
    assert httpx.delete(f"{core.url}/v1/sessions/{sid}").status_code == 204
    gone = httpx.delete(f"{core.url}/v1/sessions/{sid}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_not_found"


def test_limits_and_bad_steps_are_clear_4xx(core: Server) -> None:
    too_long = _step(core, "b2" * 16, 0, 65)
    assert too_long.status_code == 413 and "max_tokens_per_session is 64" in too_long.json()["error"]["message"]
    bad = httpx.post(core.url + "/v1/step", content=b"\x00\x00\x00\x05hello")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert _step(core, "c3" * 16, 0, 2).status_code == 200
    assert _step(core, "c3" * 16, 9, 1).status_code == 409
    assert _step(core, "d4" * 16, 3, 1).status_code == 404
    assert _step(core, "e5" * 16, 0, 1).status_code == 200
    full = _step(core, "f6" * 16, 0, 1)
    assert full.status_code == 429 and "max_sessions=2" in full.json()["error"]["message"]
    for sid in ("c3", "e5"):
        httpx.delete(f"{core.url}/v1/sessions/{sid * 16}")
    bundle = httpx.get(core.url + "/v1/info").json()["bundle_id"]
    wrong_dim = httpx.post(core.url + "/v1/step", content=wire.encode_request(
        StepRequest("g7" * 16, 0, torch.randn(1, 8), bundle_id=bundle)))
    assert wrong_dim.status_code == 400 and wrong_dim.json()["error"]["code"] == "dim_mismatch"


def test_a_step_may_not_ask_for_more_rows_than_the_cap(core: Server) -> None:
    greedy = _step(core, "i9" * 16, 0, 1, want=[0] * 65)  # 22 bytes of want, 65 rows of answer
    assert greedy.status_code == 413 and greedy.json()["error"]["code"] == "result_rows_limit"


def test_a_step_for_another_bundle_is_refused(core: Server) -> None:
    other = _step(core, "h8" * 16, 0, 1, bundle_id="0" * 32)
    assert other.status_code == 409 and other.json()["error"]["code"] == "bundle_mismatch"


def test_metrics_expose_what_the_chart_scales_on(core: Server) -> None:
    text = httpx.get(core.url + "/metrics").text
    for name in ("veil_core_queued_steps", "veil_core_active_sessions", "veil_core_step_seconds_bucket",
                 'veil_core_tokens_total{kind="prefill"}', "veil_core_batch_tokens_bucket", "veil_core_ready 1.0"):
        assert name in text


def test_unknown_route_is_openai_shaped_404(core: Server) -> None:
    r = httpx.get(core.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
