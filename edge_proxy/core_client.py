"""How the edge reaches the core: a one-method-per-call transport, sealed end to end over HTTP.

This is the one error boundary between edge and core, as httpx maps httpcore's errors: every
refusal, timeout or malformed answer of the core becomes a `CoreError` whose message the
edge writes. The core is untrusted, so its own words never reach the client; its error code
only picks the class. Only `veil.wire` frames cross the transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import ssl
import urllib.parse
import urllib.request
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from edge_proxy.metrics import EdgeMetrics
from veil import wire
from veil.channel import Channel, CoreKeys, EdgeHello
from veil.errors import (
    BundleMismatch,
    ConfigError,
    CoreBusy,
    CoreError,
    CoreIdentityMismatch,
    CoreProtocolError,
    CoreTimeout,
    CoreUnavailable,
    EdgeNotAdmitted,
    SessionLost,
    VeilError,
)
from veil.identity import CorePin, fingerprint, load_or_create, parse_public_key, public_text, unb64
from veil.settings import Settings
from veil.wire import StepRequest, StepResult

log = logging.getLogger("veil.edge.core_client")
_CODE = re.compile(r"^[a-z0-9_]{1,48}$")  # what of the core's error code is safe to log


class CoreTransport(Protocol):
    async def step(self, req: StepRequest) -> StepResult: ...

    async def close_session(self, session: str) -> None: ...

    async def info(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def core_refusal(status: int, code: str | None) -> CoreError:
    """The edge's error for a core that answered `status` with error `code`."""
    if status == 404 and code == "session_not_found":
        return SessionLost("the core no longer holds this generation's session")
    if status == 429 or (status == 503 and code == "queue_full"):
        return CoreBusy("the core is at its capacity; retry shortly")
    if status == 409 and code == "bundle_mismatch":
        return BundleMismatch()
    if status == 503:
        return CoreUnavailable("the core is not ready", code="core_not_ready")
    safe = code if isinstance(code, str) and _CODE.match(code) else "-"
    log.warning("core refused a call status=%d code=%s", status, safe)
    return CoreProtocolError(f"the core failed this request (HTTP {status}); the edge cannot complete it")


def _code_of(response: httpx.Response) -> str | None:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def check_result(req: StepRequest, result: StepResult) -> StepResult:
    """A result must answer this step: its session, its new length and one row per wanted index."""
    expected = (len(req.want), req.hidden.shape[1])
    if (result.session != req.session or result.length != req.offset + req.hidden.shape[0]
            or tuple(result.hidden.shape) != expected):
        raise CoreProtocolError("the core answered a step with a result for something else")
    return result


def _core_keys(ident: dict[str, str]) -> CoreKeys:
    pq = ident.get("mlkem768_public_key")
    return CoreKeys(parse_public_key(ident["public_key"]),
                    mlkem.MLKEM768PublicKey.from_public_bytes(unb64(pq)) if pq else None)


def environment_proxy(url: str) -> str | None:
    """The forward proxy the environment names for `url` (HTTP_PROXY, HTTPS_PROXY or ALL_PROXY, unless NO_PROXY
    covers its host), as an httpx client would take it: the edge calls a transport directly (see
    `HttpCoreTransport._send`), and a transport reads no environment."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


_RESUMABLE = {"session_unknown", "draining", "not_ready", "runner_failed", "load_failed"}
RESUME_BACKOFF = (0.05, 0.25, 1.0)  # seconds before each re-handshake after a replica went away


class _Resume(Exception):
    """This replica cannot go on with the session's channel (gone, draining, lost the keys): re-handshake."""


class _Link:
    """One core session as the edge holds it: its own connection (so its steps stay on one replica),
    its channel and its locker key."""

    def __init__(self, connection: httpx.AsyncBaseTransport, channel: Channel, locker_key: bytes):
        self.connection, self.channel, self.locker_key = connection, channel, locker_key
        self.fresh = True  # the first frame of a channel carries the locker key


class HttpCoreTransport:
    """Sealed steps to a pinned core: one handshake per session, then AEAD frames (see veil.channel).

    `transport` lets tests stand in for the network: every call goes to it (closing it must leave it usable,
    as `httpx.MockTransport` does)."""

    def __init__(self, base_url: str, timeout: float, *, identity: x25519.X25519PrivateKey, pin: CorePin,
                 post_quantum: bool = False, transport: httpx.AsyncBaseTransport | None = None,
                 metrics: EdgeMetrics | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.identity, self.pin, self.post_quantum = timeout, identity, pin, post_quantum
        self.metrics = metrics
        self._transport = transport
        self._ssl = ssl.create_default_context()  # made once: per-session connections share it
        self._timeouts = httpx.Timeout(timeout).as_dict()
        self._proxy = environment_proxy(self.base_url)
        if self._proxy is not None:  # not the proxy's address: it may hold credentials
            log.info("calls to the core go through the proxy the environment names")
        self._info_connection = self._connection()
        self._core: CoreKeys | None = None  # the core's keys, once /v1/info matched the pin
        self._links: dict[str, _Link] = {}

    def _connection(self) -> httpx.AsyncBaseTransport:
        """At most one connection: a session's calls all reach the replica that holds it."""
        if self._transport is not None:
            return self._transport
        return httpx.AsyncHTTPTransport(verify=self._ssl, limits=httpx.Limits(max_connections=1), proxy=self._proxy)

    async def _send(self, connection: httpx.AsyncBaseTransport, method: str, path: str, *, resumable: bool = True,
                    content: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """One call; a refusal that a re-handshake elsewhere may cure raises _Resume when `resumable` (session
        calls, which handle it), else the edge's error for it.

        Calls go to the transport itself, not through an `httpx.AsyncClient`: the client's layers (merging
        defaults, cookies, auth, redirect handling) cost about 160 of a step's 600 µs of the edge's CPU on
        loopback, paid per token by every stream, and a core has no use for any of them (a redirect or a
        cookie from it is ignored, as before)."""
        request = httpx.Request(method, self.base_url + path, content=content, headers=headers,
                                extensions={"timeout": self._timeouts})
        try:
            response = await connection.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise CoreTimeout("the core did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise CoreUnavailable("the core server is unreachable", code="core_unreachable") from exc
        if response.status_code >= 400:
            code = _code_of(response)
            if resumable and code in _RESUMABLE and response.status_code in (401, 503):
                raise _Resume()
            if response.status_code == 401 and code == "edge_not_admitted":
                raise EdgeNotAdmitted(f"the core at {self.base_url} does not admit this edge: enroll its key "
                                      f"{public_text(self.identity.public_key())} in core.allowed_edges")
            raise core_refusal(response.status_code, code)
        return response

    async def info(self) -> dict[str, Any]:
        """The core's public info; its keys are used only if one of them matches the pin."""
        # not resumable: a core still loading or shutting down is a 503 for the caller (an edge starting beside
        # its core, /readyz, a request), never the session-level signal escaping as an unhandled exception
        response = await self._send(self._info_connection, "GET", "/v1/info", resumable=False)
        try:
            info = response.json()
            offered = [_core_keys(ident) for ident in info.get("identities") or [info["identity"]]]
        except (ValueError, KeyError, TypeError, AttributeError, VeilError) as exc:
            raise CoreProtocolError("the core's /v1/info is not the object the edge expects") from exc
        if not isinstance(info.get("bundle_id"), str) or not offered:
            raise CoreProtocolError("the core's /v1/info is not the object the edge expects")
        self._core = next((keys for keys in offered if self.pin.matches(keys.x_key)), None)
        if self._core is None:
            raise CoreIdentityMismatch(f"the core at {self.base_url} presents key {fingerprint(offered[0].x_key)}, "
                                       f"not the pinned {self.pin}; the edge sends it nothing")
        return info

    async def _open(self, sid: str, bundle_id: str, resume: bool, locker_key: bytes) -> _Link:
        if self._core is None:
            await self.info()
        assert self._core is not None
        hello = EdgeHello(self.identity, self._core, sid, bundle_id, resume=resume, post_quantum=self.post_quantum)
        connection = self._connection()
        try:
            reply = await self._send(connection, "POST", "/v1/sessions", content=hello.body,
                                     headers={"content-type": "application/octet-stream"})
            link = _Link(connection, hello.finish(reply.content), locker_key)
        except (EdgeNotAdmitted, CoreIdentityMismatch):
            await connection.aclose()
            self._core = None
            await self.info()  # a core that no longer shows the pinned key says so here, by name
            raise
        except BaseException:
            await connection.aclose()
            raise
        self._links[sid] = link
        return link

    async def _resume(self, sid: str, bundle_id: str, locker_key: bytes) -> _Link:
        """A new handshake for a session whose replica went away; the core looks for it in the locker."""
        failure: Exception = CoreUnavailable("the core server is unreachable", code="core_unreachable")
        for delay in RESUME_BACKOFF:
            await asyncio.sleep(delay)
            try:
                link = await self._open(sid, bundle_id, True, locker_key)
            except (_Resume, CoreUnavailable) as exc:
                if isinstance(exc, (CoreIdentityMismatch, EdgeNotAdmitted, BundleMismatch, CoreBusy)):
                    raise
                failure = exc if isinstance(exc, CoreUnavailable) else failure
                continue
            if self.metrics is not None:
                self.metrics.core_resumes.inc()
            log.info("core session resumed on a fresh handshake")
            return link
        raise failure

    async def _step_on(self, link: _Link, req: StepRequest) -> StepResult:
        if link.fresh:
            req = dataclasses.replace(req, locker_key=link.locker_key)
        frame = link.channel.seal("step", wire.encode_request(req))
        seq = link.channel.sent - 1
        try:
            response = await self._send(link.connection, "POST", f"/v1/sessions/{req.session}/step", content=frame,
                                        headers={"content-type": wire.CONTENT_TYPE, "x-request-id": req.request_id})
        except CoreUnavailable as exc:
            if exc.code == "core_unreachable":  # the connection broke: the replica may be gone
                raise _Resume() from exc
            raise
        link.fresh = False
        try:
            result = wire.decode_result(link.channel.open("step", response.content, seq=seq))
        except VeilError as exc:
            raise CoreProtocolError("the core answered a step with a frame that does not open") from exc
        except (ValueError, TypeError) as exc:
            raise CoreProtocolError("the core answered a step with a malformed frame") from exc
        return check_result(req, result)

    async def step(self, req: StepRequest) -> StepResult:
        link = self._links.get(req.session)
        if link is None:
            link = await self._open(req.session, req.bundle_id, False, secrets.token_bytes(32))
        try:
            return await self._step_on(link, req)
        except _Resume:
            await self._drop(req.session)
        link = await self._resume(req.session, req.bundle_id, link.locker_key)
        try:
            return await self._step_on(link, req)
        except _Resume as exc:
            raise CoreUnavailable("the core lost this session twice in a row", code="core_unreachable") from exc

    async def _drop(self, sid: str) -> None:
        link = self._links.pop(sid, None)
        if link is not None:
            await link.connection.aclose()

    async def close_session(self, session: str) -> None:
        link = self._links.get(session)
        if link is None:
            return
        try:
            await self._send(link.connection, "DELETE", f"/v1/sessions/{session}",
                             content=link.channel.seal("close", b""))
        except (CoreError, _Resume) as exc:  # idle expiry and the locker TTL are the fallback
            log.info("closing a core session failed code=%s", getattr(exc, "code", "resume"))
        finally:
            await self._drop(session)

    async def aclose(self) -> None:
        for sid in list(self._links):
            await self._drop(sid)
        await self._info_connection.aclose()


def transport_from_settings(settings: Settings, metrics: EdgeMetrics | None = None) -> HttpCoreTransport:
    """The edge's transport: its own identity (made on first start) and the pinned core key."""
    if not settings.edge.core_public_key:
        raise ConfigError("edge.core_public_key is not set: pin the core's key (its fingerprint, which "
                          "`veil core identity` prints); the edge sends nothing to an unpinned core")
    return HttpCoreTransport(settings.edge.core_url, settings.edge.core_timeout_seconds,
                             identity=load_or_create(settings.edge_identity_path()),
                             pin=CorePin.parse(settings.edge.core_public_key),
                             post_quantum=settings.edge.post_quantum, metrics=metrics)
