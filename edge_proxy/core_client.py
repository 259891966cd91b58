"""How the edge reaches the core: a one-method-per-call transport, over pooled keep-alive HTTP.

This is the one error boundary between edge and core, as httpx maps httpcore's errors: every
refusal, timeout or malformed answer of the core becomes a `CoreError` whose message the
edge writes. The core is untrusted, so its own words never reach the client; its error code
only picks the class. Only `veil.wire` frames cross the transport.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

import httpx

from veil import wire
from veil.errors import (
    BundleMismatch,
    CoreBusy,
    CoreError,
    CoreProtocolError,
    CoreTimeout,
    CoreUnavailable,
    InvalidRequest,
    SessionLost,
)
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


class HttpCoreTransport:
    """Steps as binary POSTs over one pooled httpx client (`transport` lets tests stand in for the network)."""

    def __init__(self, base_url: str, timeout: float, connections: int,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits, transport=transport)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise CoreTimeout("the core did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise CoreUnavailable("the core server is unreachable", code="core_unreachable") from exc
        if response.status_code >= 400:
            raise core_refusal(response.status_code, _code_of(response))
        return response

    async def step(self, req: StepRequest) -> StepResult:
        body = wire.encode_request(req)
        response = await self._send("POST", "/v1/step", content=body,
                                    headers={"content-type": wire.CONTENT_TYPE, "x-request-id": req.request_id})
        try:
            result = wire.decode_result(response.content)
        except (InvalidRequest, ValueError, TypeError) as exc:
            raise CoreProtocolError("the core answered a step with a malformed frame") from exc
        return check_result(req, result)

    async def close_session(self, session: str) -> None:
        try:
            await self._send("DELETE", f"/v1/sessions/{session}")
        except SessionLost:
            pass  # already gone
        except CoreError as exc:  # idle expiry is the fallback
            log.warning("closing a core session failed code=%s", exc.code)

    async def info(self) -> dict[str, Any]:
        response = await self._send("GET", "/v1/info")
        try:
            info = response.json()
        except ValueError:
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("bundle_id"), str):
            raise CoreProtocolError("the core's /v1/info is not the object the edge expects")
        return info

    async def aclose(self) -> None:
        await self._client.aclose()
