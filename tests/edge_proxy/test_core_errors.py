"""A core that fails, through the transport seam: the OpenAI client gets a 502/503/504 in the edge's words.

The core is untrusted: whatever it answers (its own error text, a status the edge never asked
for, a frame that does not parse), the client sees the edge's message and a gateway status.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import x25519

from admin.plane import build_plane
from cloaking.secretbox import KeySource
from edge_proxy.app import create_app
from edge_proxy.core_client import HttpCoreTransport
from edge_proxy.edge_model import EdgeModel
from tests.edge_app import ThreadedEdge
from tests.edge_proxy.test_routes import HELLO, MODEL, tiny_edge_settings
from veil import wire
from veil.channel import Channel, open_hello
from veil.errors import CoreIdentityMismatch, VeilError
from veil.identity import CoreIdentity, CorePin, fingerprint, raw_public

CORE_WORDS = "core-operator-says-xyzzy"  # must never reach the client


def _json_error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": CORE_WORDS, "type": "x", "param": None, "code": code}})


class FakeCore:
    """Holds a real core identity and does real handshakes; answers every step with `answer`.

    `presents` is the identity /v1/info shows (another key, to play a core the edge did not pin)."""

    def __init__(self, bundle_id: str, edge_public: bytes):
        self.bundle_id, self.edge_public = bundle_id, edge_public
        self.identity = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
        self.presents = self.identity
        self.channels: dict[str, Channel] = {}
        self.posts: list[str] = []  # paths of every POST the edge made
        self.answer: Callable[[httpx.Request, FakeCore], httpx.Response] = lambda r, f: _json_error(500, "boom")
        self.info_answer: httpx.Response | None = None  # what /v1/info answers instead of the info

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info" and self.info_answer is not None:
            return self.info_answer
        if request.url.path == "/v1/info":
            return httpx.Response(200, json={"bundle_id": self.bundle_id, "max_tokens_per_session": 512,
                                             "identity": self.presents.info()})
        if request.method == "DELETE":
            return httpx.Response(204)
        self.posts.append(request.url.path)
        if request.url.path == "/v1/sessions":
            try:
                hello = open_hello(request.content, [self.presents], {self.edge_public})
            except VeilError as exc:
                return _json_error(exc.status_code, str(exc.code))
            reply, self.channels[hello.sid] = hello.accept()
            return httpx.Response(200, content=reply)
        return self.answer(request, self)

    def request_of(self, request: httpx.Request) -> tuple[int, wire.StepRequest, Channel]:
        channel = self.channels[request.url.path.split("/")[3]]
        seq, plain = channel.peek("step", request.content)
        return seq, wire.decode_request(plain), channel


@pytest.fixture(scope="module")
def edge(tiny_bundles, key_file: Path, tmp_path_factory):
    _, edge_dir, _ = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path_factory.mktemp("core-errors-home"))
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    edge_key = x25519.X25519PrivateKey.generate()
    fake = FakeCore(model.spec.bundle_id, raw_public(edge_key.public_key()))
    transport = HttpCoreTransport("http://core.invalid", 5, identity=edge_key,
                                  pin=CorePin.parse(fingerprint(fake.identity.public)),
                                  transport=httpx.MockTransport(fake))
    server = ThreadedEdge(create_app(settings, model, core=transport, plane=build_plane(settings)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield fake, client, server
    server.stop()


def _raise(exc: Exception) -> Callable[[httpx.Request, FakeCore], httpx.Response]:
    def answer(request: httpx.Request, fake: FakeCore) -> httpx.Response:
        raise exc
    return answer


def _sealed(payload: bytes) -> Callable[[httpx.Request, FakeCore], httpx.Response]:
    def answer(request: httpx.Request, fake: FakeCore) -> httpx.Response:
        seq, _, channel = fake.request_of(request)
        return httpx.Response(200, content=channel.seal("step", payload, seq=seq))
    return answer


def _unsealed(payload: bytes) -> Callable[[httpx.Request, FakeCore], httpx.Response]:
    return lambda request, fake: httpx.Response(200, content=payload, headers={"content-type": wire.CONTENT_TYPE})


def _wrong_rows(request: httpx.Request, fake: FakeCore) -> httpx.Response:
    seq, req, channel = fake.request_of(request)
    result = wire.StepResult(req.session, req.offset + req.hidden.shape[0], torch.zeros(3, req.hidden.shape[1]))
    return httpx.Response(200, content=channel.seal("step", wire.encode_result(result), seq=seq))


def _plain_result(request: httpx.Request, fake: FakeCore) -> httpx.Response:
    """A well-formed result, but not sealed: whoever sits on the path cannot inject one."""
    _, req, _ = fake.request_of(request)
    result = wire.StepResult(req.session, req.offset + req.hidden.shape[0], torch.zeros(1, req.hidden.shape[1]))
    return httpx.Response(200, content=wire.encode_result(result))


def _error(status: int, code: str) -> Callable[[httpx.Request, FakeCore], httpx.Response]:
    return lambda request, fake: _json_error(status, code)


CASES = {
    "offset conflict": (_error(409, "offset_mismatch"), 502, "core_protocol_error"),
    "token limit": (_error(413, "session_token_limit"), 502, "core_protocol_error"),
    "internal error": (_error(500, "internal_error"), 502, "core_protocol_error"),
    "bad request": (_error(400, "invalid_request"), 502, "core_protocol_error"),
    "unauthenticated": (_error(401, "unauthorized"), 502, "core_protocol_error"),
    "frame refused": (_error(401, "frame_rejected"), 502, "core_protocol_error"),
    "edge not enrolled": (_error(401, "edge_not_admitted"), 503, "edge_not_admitted"),
    "not json": (lambda r, f: httpx.Response(500, content=b"<html>" + CORE_WORDS.encode()), 502,
                 "core_protocol_error"),
    "malformed frame": (_sealed(b"\x00\x00\x00\x02{}" + CORE_WORDS.encode()), 502, "core_protocol_error"),
    "truncated frame": (_sealed(b"\x00"), 502, "core_protocol_error"),
    "unsealed frame": (_unsealed(b"\x00" * 64), 502, "core_protocol_error"),
    "a plaintext result": (_plain_result, 502, "core_protocol_error"),
    "rows it was not asked for": (_wrong_rows, 502, "core_protocol_error"),
    "session limit": (_error(429, "session_limit"), 503, "core_busy"),
    "edge quota": (_error(429, "edge_session_quota"), 503, "core_busy"),
    "queue full": (_error(503, "queue_full"), 503, "core_busy"),
    "other bundle": (_error(409, "bundle_mismatch"), 503, "bundle_mismatch"),
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
    fake.answer = _error(409, "bundle_mismatch")
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


def test_a_core_that_presents_another_key_gets_nothing_sealed(edge, tiny_bundles, key_file: Path) -> None:
    fake, client, server = edge
    impostor = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())
    fake.presents, fake.posts = impostor, []
    try:
        # an edge that meets the impostor first sends it nothing at all
        fresh = HttpCoreTransport("http://core.invalid", 5, identity=x25519.X25519PrivateKey.generate(),
                                  pin=CorePin.parse(fingerprint(fake.identity.public)), transport=httpx.MockTransport(fake))
        step = wire.StepRequest("ab" * 16, 0, torch.zeros(2, 64), bundle_id=fake.bundle_id)
        with pytest.raises(CoreIdentityMismatch, match=fingerprint(impostor.public)):
            asyncio.run(fresh.step(step))
        assert fake.posts == []
        # a running edge whose core is swapped sends only a hello sealed to the pinned key, then stops
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "core_identity_mismatch"
        assert fingerprint(impostor.public) in err.value.body["message"], "the message names the key it saw"
        assert fake.posts == ["/v1/sessions"]
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "core_identity_mismatch"
    finally:
        fake.presents = fake.identity
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_a_core_that_shows_the_pinned_key_without_holding_it_cannot_finish_the_handshake(edge) -> None:
    fake, client, _ = edge
    fake.posts = []
    real = fake.presents
    stolen_public = dict(real.info())  # an impostor copies the public half it can read from /v1/info ...
    impostor = CoreIdentity.from_key(x25519.X25519PrivateKey.generate())

    class Claims(CoreIdentity):
        def info(self) -> dict[str, str]:
            return stolen_public

    fake.presents = Claims(impostor.x_key, impostor.pq_key)  # ... but holds another private key
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert err.value.status_code == 503
        assert fake.posts == ["/v1/sessions"], "only the hello, which it cannot open, reached it"
    finally:
        fake.presents = real


@pytest.mark.parametrize("code", ["not_ready", "draining"])
def test_an_edge_started_before_its_core_is_ready_serves_503_until_it_is(tiny_bundles, key_file: Path,
                                                                         tmp_path: Path, code: str) -> None:
    """A core still loading its bundle (or shutting down) answers /v1/info 503: the edge starts anyway, and its
    /readyz and requests are OpenAI-shaped 503s in its own words until the core is ready."""
    _, edge_dir, _ = tiny_bundles["llama"]
    settings = tiny_edge_settings(tmp_path)
    model = EdgeModel.load(edge_dir, KeySource(key_file=key_file))
    edge_key = x25519.X25519PrivateKey.generate()
    fake = FakeCore(model.spec.bundle_id, raw_public(edge_key.public_key()))
    fake.info_answer = _json_error(503, code)
    transport = HttpCoreTransport("http://core.invalid", 5, identity=edge_key,
                                  pin=CorePin.parse(fingerprint(fake.identity.public)),
                                  transport=httpx.MockTransport(fake))
    server = ThreadedEdge(create_app(settings, model, core=transport, plane=build_plane(settings)), wait_ready=False)
    try:
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "core_not_ready"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "core_not_ready"
        assert CORE_WORDS not in err.value.response.text
        fake.info_answer = None  # the core has loaded
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()
