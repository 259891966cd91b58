"""JWT / OIDC bearer tokens against a real JWKS server on loopback: each bad token gets its exact outcome."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from admin.jwt_auth import JwtSettings, JwtVerifier
from admin.principal import Principal
from tests.json_server import json_server
from veil.errors import AuthenticationFailed, ConfigError, ServiceUnavailable

ISS, AUD = "https://idp.example", "veil-edge"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_NEXT = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
MINTED: list[str] = []  # every token a test made; none may show up in a log


def jwk(private: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    """The public JWK for a private key."""
    cls = (RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey)
           else ECAlgorithm if isinstance(private, ec.EllipticCurvePrivateKey) else OKPAlgorithm)
    out: dict[str, Any] = dict(cls.to_jwk(private.public_key(), as_dict=True))
    out.update(kid=kid, use="sig", **({"alg": alg} if alg else {}))
    return out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300, "scope": "generate read"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1", **over: Any) -> str:
    token = jwt.encode(claims(**over), key, algorithm=alg, headers={"kid": kid} if kid else None)
    MINTED.append(token)
    return token


def hand_built(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token pyjwt would refuse to make: `alg: none`, or HMAC under a public key."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    token = f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"
    MINTED.append(token)
    return token


@dataclasses.dataclass
class Jwks:
    """What the loopback JWKS server serves, and how often it was asked."""

    keys: list[dict[str, Any]]
    status: int = 200
    hits: int = 0


@pytest.fixture
def jwks() -> Iterator[tuple[Jwks, str]]:
    state = Jwks(keys=[jwk(RSA_KEY, "rsa-1", "RS256"), jwk(EC_KEY, "ec-1"), jwk(ED_KEY, "ed-1")])

    def answer(path: str) -> tuple[int, Any]:
        state.hits += 1
        return state.status, {"keys": state.keys}

    with json_server(answer) as url:
        yield state, url + "/jwks"


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG, logger="veil.admin.jwt")
    MINTED.clear()
    yield
    for token in MINTED:
        assert token not in caplog.text and token.split(".")[1] not in caplog.text


class Clock:
    """A monotonic clock the test moves by hand (JWKS cache and refresh throttle)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(url: str = "", **over: Any) -> JwtSettings:
    return JwtSettings(issuer=ISS, audience=AUD, jwks_url=url, default_rpm=60, default_tpm=1000, **over)


def verify(s: JwtSettings, token: str) -> Principal:
    async def go() -> Principal:
        v = JwtVerifier(s)
        try:
            return await v.verify(token)
        finally:
            await v.aclose()
    return asyncio.run(go())


def reject(s: JwtSettings, token: str) -> str:
    """Verify expecting a 401; return its message after checking it leaks nothing of the token."""
    with pytest.raises(AuthenticationFailed) as info:
        verify(s, token)
    err = info.value
    assert err.status_code == 401
    assert token not in err.message and all(len(p) < 8 or p not in err.message for p in token.split("."))
    return err.message


# -- valid tokens ---------------------------------------------------------------------------------------------

def test_valid_rs256_scope_string(jwks: tuple[Jwks, str]) -> None:
    p = verify(settings(jwks[1]), mint(scope="generate read write"))
    assert p == Principal(key_id="jwt:alice", scopes=frozenset({"generate", "read"}), rpm=60, tpm=1000, kind="jwt")


@pytest.mark.parametrize(("key", "alg", "kid"), [(EC_KEY, "ES256", "ec-1"), (ED_KEY, "EdDSA", "ed-1")])
def test_valid_ec_and_eddsa_scp_list(jwks: tuple[Jwks, str], key: Any, alg: str, kid: str) -> None:
    p = verify(settings(jwks[1]), mint(key, alg, kid, scope=None, scp=["admin", "unknown"]))
    assert (p.key_id, p.scopes, p.kind) == ("jwt:alice", frozenset({"admin"}), "jwt")


def test_no_scope_claim_means_no_scopes(jwks: tuple[Jwks, str]) -> None:
    assert verify(settings(jwks[1]), mint(scope=None)).scopes == frozenset()


def test_within_leeway_is_accepted(jwks: tuple[Jwks, str]) -> None:
    now = int(time.time())
    assert verify(settings(jwks[1]), mint(exp=now - 10, nbf=now + 10, iat=now + 10)).key_id == "jwt:alice"


def test_no_kid_needs_a_single_key_jwks(jwks: tuple[Jwks, str]) -> None:
    state, url = jwks
    assert reject(settings(url), mint(kid=None)) == "invalid bearer token: no kid and the JWKS does not have exactly one key"
    state.keys = [jwk(RSA_KEY, "rsa-1")]
    assert verify(settings(url), mint(kid=None)).key_id == "jwt:alice"


# -- rejected tokens ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("over", "reason"), [
    ({"exp": -120}, "expired"),
    ({"nbf": 120}, "not yet valid"),
    ({"aud": "some-other-service"}, "wrong audience"),
    ({"iss": "https://evil.example"}, "wrong issuer"),
    ({"exp": None}, "missing exp claim"),
    ({"sub": None}, "missing sub claim"),
    ({"sub": ""}, "invalid subject"),
    ({"scope": ["generate"]}, "malformed scope claim"),
])
def test_bad_claims(jwks: tuple[Jwks, str], over: dict[str, Any], reason: str) -> None:
    now = int(time.time())
    over = {k: now + v if k in ("exp", "nbf") and v is not None else v for k, v in over.items()}
    message = reject(settings(jwks[1]), mint(**over))
    assert message == f"invalid bearer token: {reason}"
    assert "some-other-service" not in message and "evil" not in message  # never a claim's value


def test_wrong_signature_same_kid(jwks: tuple[Jwks, str]) -> None:
    assert reject(settings(jwks[1]), mint(RSA_OTHER)) == "invalid bearer token: bad signature"


def test_alg_none(jwks: tuple[Jwks, str]) -> None:
    token = hand_built({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims())
    assert JwtVerifier.looks_like_jwt(token)
    assert reject(settings(jwks[1]), token) == "invalid bearer token: algorithm not allowed"


def test_hs256_with_public_pem_as_secret(jwks: tuple[Jwks, str]) -> None:
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = hand_built({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(),
                       lambda msg: hmac.new(pem, msg, hashlib.sha256).digest())
    assert reject(settings(jwks[1]), token) == "invalid bearer token: algorithm not allowed"
    assert reject(settings(public_key_pem=pem.decode()), token) == "invalid bearer token: algorithm not allowed"


def test_alg_must_fit_the_key(jwks: tuple[Jwks, str]) -> None:
    s = settings(jwks[1], algorithms=("RS256", "PS256", "ES256"))
    # An allowed algorithm but the wrong key type, and an RSA alg other than the JWK's declared one.
    assert reject(s, mint(RSA_KEY, "RS256", "ec-1")) == "invalid bearer token: signing key does not match the algorithm"
    assert reject(s, mint(RSA_KEY, "PS256", "rsa-1")) == "invalid bearer token: signing key does not match the algorithm"
    assert reject(s, mint(ED_KEY, "EdDSA", "ed-1")) == "invalid bearer token: algorithm not allowed"


def test_malformed(jwks: tuple[Jwks, str]) -> None:
    assert reject(settings(jwks[1]), "eyJhbGciOi.not-json.sig") == "invalid bearer token: malformed"


# -- JWKS: cache, refresh, rotation, outage -------------------------------------------------------------------

def test_jwks_cached_then_refetched_after_ttl(jwks: tuple[Jwks, str]) -> None:
    state, url = jwks
    clock = Clock()

    async def go() -> None:
        v = JwtVerifier(settings(url, jwks_cache_s=60), clock=clock)
        for _ in range(3):
            await v.verify(mint())
        assert state.hits == 1
        clock.now += 61
        await v.verify(mint())
        assert state.hits == 2
        state.status, clock.now = 500, clock.now + 61
        with pytest.raises(ServiceUnavailable):  # stale keys are not trusted past their TTL
            await v.verify(mint())
        await v.aclose()
    asyncio.run(go())


def test_unknown_kid_refreshes_once_then_rotation_is_picked_up(jwks: tuple[Jwks, str]) -> None:
    state, url = jwks
    clock = Clock()

    async def go() -> None:
        v = JwtVerifier(settings(url), clock=clock)
        await v.verify(mint())
        assert state.hits == 1
        clock.now += 11
        with pytest.raises(AuthenticationFailed, match="unknown signing key$"):
            await v.verify(mint(kid="ghost-1"))
        assert state.hits == 2  # one refresh for the unknown kid
        with pytest.raises(AuthenticationFailed, match="unknown signing key$"):
            await v.verify(mint(kid="ghost-2"))
        assert state.hits == 2  # throttled: random kids cannot hammer the IdP
        state.keys = [jwk(RSA_NEXT, "rsa-2", "RS256")]  # the IdP rotates
        clock.now += 11
        p = await v.verify(mint(RSA_NEXT, kid="rsa-2", sub="bob"))
        assert p.key_id == "jwt:bob" and state.hits == 3
        with pytest.raises(AuthenticationFailed, match="unknown signing key$"):
            await v.verify(mint())  # the refresh replaced the set: a key the IdP dropped is dropped here too
        assert state.hits == 3
        await v.aclose()
    asyncio.run(go())


def test_concurrent_unknown_kids_share_one_fetch(jwks: tuple[Jwks, str]) -> None:
    state, url = jwks

    async def go() -> None:
        v = JwtVerifier(settings(url))
        results = await asyncio.gather(*(v.verify(mint()) for _ in range(20)))
        assert len(results) == 20 and state.hits == 1
        await v.aclose()
    asyncio.run(go())


def test_jwks_server_down_is_503() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServiceUnavailable) as info:
        verify(settings(f"http://127.0.0.1:{port}/jwks"), mint())
    assert (info.value.status_code, info.value.code) == (503, "jwks_unavailable")
    assert info.value.message == "cannot fetch the JWKS to verify the bearer token"


def test_jwks_server_error_is_503(jwks: tuple[Jwks, str]) -> None:
    jwks[0].status = 500
    with pytest.raises(ServiceUnavailable, match="cannot fetch the JWKS"):
        verify(settings(jwks[1]), mint())


def test_jwks_private_and_symmetric_keys_are_ignored(jwks: tuple[Jwks, str]) -> None:
    state, url = jwks
    private = dict(RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True), kid="rsa-1")  # type: ignore[call-overload]
    state.keys = [private, {"kty": "oct", "k": b64(b"secret"), "kid": "hs-1"}]
    assert reject(settings(url), mint()) == "invalid bearer token: unknown signing key"


# -- configured public key, settings, shape -------------------------------------------------------------------

def test_public_key_pem_mode_without_server() -> None:
    pem = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    s = settings(public_key_pem=pem.decode())
    assert verify(s, mint(EC_KEY, "ES256", kid="anything")).key_id == "jwt:alice"
    assert verify(s, mint(EC_KEY, "ES256", kid=None)).scopes == frozenset({"generate", "read"})
    assert reject(s, mint(ec.generate_private_key(ec.SECP256R1()), "ES256")) == "invalid bearer token: bad signature"
    assert reject(s, mint(RSA_KEY)) == "invalid bearer token: signing key does not match the algorithm"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({}, "exactly one of jwks_url and public_key_pem"),
    ({"jwks_url": "https://idp/jwks", "public_key_pem": "x"}, "exactly one"),
    ({"jwks_url": "http://idp.example/jwks"}, "https://"),
    ({"jwks_url": "https://idp/jwks", "algorithms": ("HS256",)}, "asymmetric"),
    ({"jwks_url": "https://idp/jwks", "algorithms": ("none",)}, "asymmetric"),
])
def test_settings_are_checked(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        JwtSettings(issuer=ISS, audience=AUD, **kwargs)


def test_pem_must_be_a_public_key() -> None:
    private = RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    with pytest.raises(ConfigError, match="public_key_pem"):
        JwtVerifier(settings(public_key_pem=private.decode()))


def test_looks_like_jwt() -> None:
    assert JwtVerifier.looks_like_jwt(mint())
    for not_jwt in ("sk-veil-abc123DEF456", "a.b", "a.b.c.d", "a b.c.d", ""):
        assert not JwtVerifier.looks_like_jwt(not_jwt)
