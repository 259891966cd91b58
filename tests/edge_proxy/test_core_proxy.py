"""The edge's calls to the core take the forward proxy the environment names, as an httpx client would:
the edge calls httpx's transport directly, which reads no environment itself."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from edge_proxy.core_client import HttpCoreTransport, environment_proxy
from veil.errors import CoreUnavailable
from veil.identity import CorePin, fingerprint

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")


@pytest.fixture(autouse=True)
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


class _Proxy(BaseHTTPRequestHandler):
    """Records the request line's target (absolute-form when the client talks to a proxy) and answers 503."""

    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = b'{"error": {"code": "not_ready"}}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    _Proxy.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Proxy.seen
    server.shutdown()
    server.server_close()


def _info(url: str) -> None:
    key = x25519.X25519PrivateKey.generate()
    pin = CorePin.parse(fingerprint(x25519.X25519PrivateKey.generate().public_key()))

    async def main() -> None:
        transport = HttpCoreTransport(url, 5, identity=key, pin=pin)
        try:
            await transport.info()
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_calls_to_the_core_go_through_the_proxy_the_environment_names(proxy, monkeypatch) -> None:
    address, seen = proxy
    monkeypatch.setenv("HTTP_PROXY", address)
    with pytest.raises(CoreUnavailable):  # the proxy's 503
        _info("http://core.invalid:8001")
    assert seen == ["http://core.invalid:8001/v1/info"], "the proxy was asked for the core's URL"

    monkeypatch.setenv("NO_PROXY", "core.invalid")
    with pytest.raises(CoreUnavailable):  # straight to a host that does not resolve
        _info("http://core.invalid:8001")
    assert seen == ["http://core.invalid:8001/v1/info"], "NO_PROXY kept the second call away from the proxy"


def test_the_environment_proxy_follows_scheme_all_and_no_proxy(monkeypatch) -> None:
    assert environment_proxy("https://core.example:8001") is None
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    assert environment_proxy("https://core.example:8001") == "http://proxy.corp:3128"
    assert environment_proxy("http://core.example:8001") is None
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:8080")
    assert environment_proxy("http://core.example:8001") == "http://all.corp:8080"
    monkeypatch.setenv("NO_PROXY", "localhost,.example")
    assert environment_proxy("https://core.example:8001") is None
    assert environment_proxy("https://core.elsewhere:8001") == "http://proxy.corp:3128"
