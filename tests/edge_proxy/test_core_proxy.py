"""The edge's calls to the core take the forward proxy the environment names, as an httpx client would:
the edge calls httpx's transport directly, which reads no environment itself."""

from __future__ import annotations

import asyncio
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from edge_proxy.core_client import HttpCoreTransport, environment_proxy
from tests.json_server import json_server
from veil.errors import CoreUnavailable
from veil.identity import CorePin, fingerprint

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
              "no_proxy")


@pytest.fixture(autouse=True)
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    """A proxy that records each request's target (absolute-form when the client talks to a proxy) and answers
    503: the call went through it, whatever it would have forwarded."""
    seen: list[str] = []

    def answer(target: str) -> tuple[int, Any]:
        seen.append(target)
        return 503, {"error": {"code": "not_ready"}}

    with json_server(answer) as url:
        yield url, seen


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
