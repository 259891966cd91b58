"""JWT / OIDC bearer tokens: verify a signed token against a JWKS or a configured public key, yield a Principal.

Only asymmetric algorithms are accepted, named explicitly to pyjwt, and the header's `alg` must fit the key's
type (and its declared `alg`), so `alg: none` and HS/RS confusion cannot verify. Every failure is an
AuthenticationFailed (401) whose message names the reason, never the token or a claim's value; an unreachable
JWKS is a ServiceUnavailable (503).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from admin.principal import Principal, Scope
from veil.errors import AuthenticationFailed, ConfigError, ServiceUnavailable

log = logging.getLogger("veil.admin.jwt")

JWKS_MIN_REFRESH_S = 10.0  # an unknown kid refetches the JWKS at most this often: random kids cannot DoS the IdP
JWKS_TIMEOUT_S = 5.0
MAX_TOKEN_CHARS = 16_384
MIN_RSA_BITS = 2048

# JWS algorithm -> JWK key type (and EC curve); anything not here (HS*, none) is never accepted.
_KTY_FOR_ALG = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
    "EdDSA": "OKP",
}
_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_FROM_JWK: dict[str, Any] = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}
_KNOWN_SCOPES = frozenset(s.value for s in Scope)
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PREFIX = "invalid bearer token: "


@dataclasses.dataclass(frozen=True, slots=True)
class JwtSettings:
    """Which tokens to trust: issuer, audience, and where the verification keys come from."""

    issuer: str
    audience: str
    jwks_url: str = ""  # OIDC JWKS endpoint; or
    public_key_pem: str = ""  # a configured PEM public key (exactly one of the two)
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")  # asymmetric only; HS* and "none" are never accepted
    leeway_s: float = 30.0
    jwks_cache_s: float = 300.0
    default_rpm: int | None = None
    default_tpm: int | None = None

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ConfigError("JWT auth needs both an issuer and an audience")
        if bool(self.jwks_url) == bool(self.public_key_pem):
            raise ConfigError("JWT auth needs exactly one of jwks_url and public_key_pem")
        if self.jwks_url:
            _check_jwks_url(self.jwks_url)
        bad = [a for a in self.algorithms if a not in _KTY_FOR_ALG]
        if bad or not self.algorithms:
            raise ConfigError(f"JWT algorithms must be asymmetric ones from {sorted(_KTY_FOR_ALG)}; got {bad or 'none'}")
        if not 0 <= self.leeway_s <= 300:
            raise ConfigError("JWT leeway_s must be between 0 and 300 seconds")
        if self.jwks_cache_s <= 0:
            raise ConfigError("JWT jwks_cache_s must be positive")


def _check_jwks_url(url: str) -> None:
    """Plain http would let anyone on the path swap the keys; allow it only on loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return
    raise ConfigError("JWT jwks_url must be an https:// URL (http:// only on loopback)")


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    """One verification key, parsed once, with what it may verify."""

    kid: str | None
    kty: str  # RSA | EC | OKP
    alg: str | None  # the JWK's declared alg, if any
    key: Any  # a cryptography public key

    def fits(self, alg: str) -> bool:
        if _KTY_FOR_ALG.get(alg) != self.kty or (self.alg is not None and self.alg != alg):
            return False
        return alg not in _CURVE_FOR_ALG or self.key.curve.name == _CURVE_FOR_ALG[alg]


def _key_from_public(public: Any, kid: str | None = None, alg: str | None = None) -> _Key:
    """Wrap a cryptography public key, naming its JWK key type; refuse weak or unsupported ones."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
        return _Key(kid, "RSA", alg, public)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return _Key(kid, "EC", alg, public)
    if isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return _Key(kid, "OKP", alg, public)
    raise ValueError(f"unsupported key type {type(public).__name__}")


def _key_from_jwk(jwk: Any) -> _Key | None:
    """Parse one JWKS entry, or None (logged) for one that cannot verify our tokens."""
    if not isinstance(jwk, dict):
        return None
    kid, kty, alg = jwk.get("kid"), jwk.get("kty"), jwk.get("alg")
    label = kid if isinstance(kid, str) else "(no kid)"
    if kty not in _FROM_JWK or jwk.get("use", "sig") != "sig" or (alg is not None and alg not in _KTY_FOR_ALG):
        log.debug("JWKS key %s skipped: not an asymmetric signing key", label)
        return None
    if "d" in jwk:  # a private key published in a JWKS is a misconfiguration worth shouting about
        log.warning("JWKS key %s skipped: it contains private key material", label)
        return None
    try:
        public = _FROM_JWK[kty].from_jwk(jwk)
        return _key_from_public(public, kid if isinstance(kid, str) else None, alg)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        log.warning("JWKS key %s skipped: %s", label, type(exc).__name__)
        return None


def _fail(reason: str) -> AuthenticationFailed:
    log.info("bearer token rejected: %s", reason)
    return AuthenticationFailed(_PREFIX + reason)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Known scopes from `scope` (space-separated) and/or `scp` (list or string); unknown ones are dropped."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            found.update(value.split())
        elif name == "scp" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            found.update(value)
        else:
            raise _fail(f"malformed {name} claim")
    return frozenset(found & _KNOWN_SCOPES)


class JwtVerifier:
    """Verifies bearer JWTs; JWKS keys are cached and refetched on expiry or, rate-limited, on an unknown kid."""

    def __init__(self, settings: JwtSettings, *, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self._static: _Key | None = None
        if settings.public_key_pem:
            try:
                public = serialization.load_pem_public_key(settings.public_key_pem.encode())
                self._static = _key_from_public(public)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"JWT public_key_pem is not a usable PEM public key: {exc}") from exc
        self._own_http = http is None and self._static is None  # a caller's client is the caller's to close
        self._http = httpx.AsyncClient(timeout=JWKS_TIMEOUT_S) if self._own_http else http
        self._keys: list[_Key] | None = None
        self._fetched_at = float("-inf")  # last successful fetch
        self._attempted_at = float("-inf")  # last fetch, successful or not
        self._attempts = 0
        self._lock = asyncio.Lock()

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        """Three base64url segments (the last may be empty): a JWT, not an sk-veil-... API key."""
        return len(token) <= MAX_TOKEN_CHARS and _JWT_SHAPE.fullmatch(token) is not None

    async def verify(self, token: str) -> Principal:
        """The Principal for a valid token; AuthenticationFailed (or ServiceUnavailable for the JWKS) otherwise."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            raise _fail("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _fail("malformed") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.settings.algorithms:
            raise _fail("algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise _fail("malformed")
        key = await self._key_for(kid, alg)
        claims = self._decode(token, key, alg)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 255 or not sub.isprintable():
            raise _fail("invalid subject")  # it becomes a key id in logs and metric labels
        s = self.settings
        return Principal(key_id=f"jwt:{sub}", scopes=_scopes(claims), rpm=s.default_rpm, tpm=s.default_tpm, kind="jwt")

    async def aclose(self) -> None:
        """Close the HTTP client if this verifier made it."""
        if self._own_http and self._http is not None:
            await self._http.aclose()

    def _decode(self, token: str, key: _Key, alg: str) -> dict[str, Any]:
        """Signature and registered claims, via pyjwt with exactly one asymmetric algorithm allowed."""
        s = self.settings
        try:
            return jwt.decode(token, key.key, algorithms=[alg], audience=s.audience, issuer=s.issuer,
                              leeway=s.leeway_s, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError as exc:
            raise _fail("expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise _fail("not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise _fail("wrong audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise _fail("wrong issuer") from exc
        except jwt.InvalidIssuedAtError as exc:
            raise _fail("bad iat claim") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _fail(f"missing {exc.claim} claim") from exc  # the claim's name, from our own list
        except jwt.InvalidSignatureError as exc:
            raise _fail("bad signature") from exc
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError) as exc:
            raise _fail("signing key does not match the algorithm") from exc
        except jwt.DecodeError as exc:
            raise _fail("malformed") from exc
        except jwt.PyJWTError as exc:
            raise _fail("invalid claims") from exc

    async def _key_for(self, kid: str | None, alg: str) -> _Key:
        """The key that should have signed this token, fetching the JWKS when stale or on an unknown kid."""
        if self._static is not None:
            if not self._static.fits(alg):
                raise _fail("signing key does not match the algorithm")
            return self._static
        if self._keys is None or self._clock() - self._fetched_at >= self.settings.jwks_cache_s:
            await self._refresh()
            if self._keys is None or self._clock() - self._fetched_at >= self.settings.jwks_cache_s:
                raise ServiceUnavailable("cannot fetch the JWKS to verify the bearer token", code="jwks_unavailable")
        matches = self._match(kid)
        if not matches and kid is not None and self._clock() - self._attempted_at >= JWKS_MIN_REFRESH_S:
            log.info("unknown signing key id; refreshing the JWKS")
            await self._refresh()
            matches = self._match(kid)
        if not matches:
            raise _fail("unknown signing key" if kid is not None else "no kid and the JWKS does not have exactly one key")
        for key in matches:
            if key.fits(alg):
                return key
        raise _fail("signing key does not match the algorithm")

    def _match(self, kid: str | None) -> list[_Key]:
        keys = self._keys or []
        if kid is None:
            return keys if len(keys) == 1 else []  # a kid-less token is unambiguous only against a single key
        return [k for k in keys if k.kid == kid]

    async def _refresh(self) -> None:
        """Fetch the JWKS once; tasks that queued behind a fetch reuse its result instead of fetching again."""
        seen = self._attempts  # counts finished fetches, so a queued task sees the one it waited for
        async with self._lock:
            if self._attempts != seen:
                return
            self._attempted_at = self._clock()
            try:
                keys = await self._fetch()
                self._keys, self._fetched_at = keys, self._clock()
            finally:
                self._attempts += 1

    async def _fetch(self) -> list[_Key]:
        url = self.settings.jwks_url
        assert self._http is not None
        try:
            resp = await self._http.get(url, timeout=JWKS_TIMEOUT_S, headers={"accept": "application/json"})
            resp.raise_for_status()
            entries = resp.json()["keys"]
            if not isinstance(entries, list):
                raise TypeError("keys is not a list")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot fetch the JWKS from %s: %s", urlsplit(url).hostname, type(exc).__name__)
            raise ServiceUnavailable("cannot fetch the JWKS to verify the bearer token", code="jwks_unavailable") from exc
        keys = [k for k in map(_key_from_jwk, entries) if k is not None]
        log.info("JWKS fetched: %d usable signing keys", len(keys))
        if not keys:
            log.warning("the JWKS at %s has no usable signing keys", urlsplit(url).hostname)
        return keys
