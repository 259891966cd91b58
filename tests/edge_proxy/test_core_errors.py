"""A core that fails, through the transport seam: the OpenAI client gets a 502/503/504 in the edge's words.

The core is untrusted: whatever it answers (its own error text, a status the edge never asked
for, a frame that does not parse), the client sees the edge's message and a gateway status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest
import torch

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.core_client import HttpCoreTransport
from edge_proxy.edge_model import EdgeModel
from tests.edge_app import ThreadedEdge
from tests.edge_proxy.test_routes import HELLO, MODEL, tiny_edge_settings
from veil import wire

CORE_WORDS = "core-operator-says-xyzzy"  # must never reach the client


def _json_error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": CORE_WORDS, "type": "x", "param": None, "code": code}})


class FakeCore:
    """Answers /v1/info truthfully and every step with `answer`."""

    def __init__(self, bundle_id: str):
        self.bundle_id = bundle_id
        self.answer: Callable[[httpx.Request], httpx.Response] = lambda request: _json_error(500, "boom")

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info":
            return httpx.Response(200, json={"bundle_id": self.bundle_id, "max_tokens_per_session": 512})
        if request.method == "DELETE":
            return httpx.Response(204)
        return self.answer(request)


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file: Path, tmp_path_factory):
    _, edge_dir, _ = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path_factory.mktemp("core-errors-home"))
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    fake = FakeCore(model.spec.bundle_id)
    transport = HttpCoreTransport("http://core.invalid", 5, 4, transport=httpx.MockTransport(fake))
    server = ThreadedEdge(create_app(settings, model, core=transport, plane=build_plane(settings)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield fake, client, server
    server.stop()


def _raise(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc
    return answer


def _frame(payload: bytes) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(200, content=payload, headers={"content-type": wire.CONTENT_TYPE})


def _wrong_rows(request: httpx.Request) -> httpx.Response:
    req = wire.decode_request(request.content)
    result = wire.StepResult(req.session, req.offset + req.hidden.shape[0], torch.zeros(3, req.hidden.shape[1]))
    return httpx.Response(200, content=wire.encode_result(result))


CASES = {
    "offset conflict": (lambda r: _json_error(409, "offset_mismatch"), 502, "core_protocol_error"),
    "token limit": (lambda r: _json_error(413, "session_token_limit"), 502, "core_protocol_error"),
    "internal error": (lambda r: _json_error(500, "internal_error"), 502, "core_protocol_error"),
    "bad request": (lambda r: _json_error(400, "invalid_request"), 502, "core_protocol_error"),
    "unauthenticated": (lambda r: _json_error(401, "unauthorized"), 502, "core_protocol_error"),
    "not json": (lambda r: httpx.Response(500, content=b"<html>" + CORE_WORDS.encode()), 502, "core_protocol_error"),
    "malformed frame": (_frame(b"\x00\x00\x00\x02{}" + CORE_WORDS.encode()), 502, "core_protocol_error"),
    "truncated frame": (_frame(b"\x00"), 502, "core_protocol_error"),
    "rows it was not asked for": (_wrong_rows, 502, "core_protocol_error"),
    "session limit": (lambda r: _json_error(429, "session_limit"), 503, "core_busy"),
    "queue full": (lambda r: _json_error(503, "queue_full"), 503, "core_busy"),
    "not ready": (lambda r: _json_error(503, "not_ready"), 503, "core_not_ready"),
    "other bundle": (lambda r: _json_error(409, "bundle_mismatch"), 503, "bundle_mismatch"),
    "timeout": (_raise(httpx.ReadTimeout("slow")), 504, "core_timeout"),
    "unreachable": (_raise(httpx.ConnectError("refused")), 503, "core_unreachable"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_a_failing_core_is_a_gateway_error_in_the_edges_words(edge, case: str, stream: bool) -> None:
    fake, client, _ = edge
    fake.answer, status, code = CASES[case]
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=stream)
    assert err.value.status_code == status
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == code and body["type"] == "server_error"
    assert CORE_WORDS not in err.value.response.text
    if code == "core_busy":
        assert err.value.response.headers["retry-after"] == "1"
    if code == "bundle_mismatch":
        assert "different cloaked bundle" in body["message"]


def test_after_a_bundle_mismatch_the_edge_verifies_the_core_again(edge) -> None:
    fake, client, server = edge
    fake.answer = lambda r: _json_error(409, "bundle_mismatch")
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    real = fake.bundle_id
    fake.bundle_id = "0" * 32  # the core was redeployed with another bundle
    try:
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "bundle_mismatch"
    finally:
        fake.bundle_id = real
    assert httpx.get(server.url + "/readyz").status_code == 200
