"""How the edge reaches the core: a small transport interface, over pooled keep-alive HTTP.

Only `veil.wire` frames cross it, so sealing can wrap them later without changing callers.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import httpx

from veil import wire
from veil.errors import ServiceUnavailable, VeilError, from_status
from veil.wire import StepRequest, StepResult

log = logging.getLogger("veil.edge.core_client")


class CoreTransport(Protocol):
    async def step(self, req: StepRequest) -> StepResult: ...

    async def close_session(self, session: str) -> None: ...

    async def info(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def _error_from(response: httpx.Response) -> VeilError:
    try:
        err = response.json()["error"]
        message, code = str(err["message"]), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = f"the core answered HTTP {response.status_code}", None
    return from_status(response.status_code, message, code)


class HttpCoreTransport:
    """Steps as binary POSTs over one pooled httpx client."""

    def __init__(self, base_url: str, timeout: float, connections: int):
        self.base_url = base_url.rstrip("/")
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailable("the core did not answer in time", code="core_timeout") from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable("the core server is unreachable", code="core_unreachable") from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    async def step(self, req: StepRequest) -> StepResult:
        body = wire.encode_request(req)
        response = await self._send("POST", "/v1/step", content=body,
                                    headers={"content-type": wire.CONTENT_TYPE, "x-request-id": req.request_id})
        return wire.decode_result(response.content)

    async def close_session(self, session: str) -> None:
        try:
            await self._send("DELETE", f"/v1/sessions/{session}")
        except VeilError as exc:
            if exc.status_code != 404:  # already gone is fine; idle expiry is the fallback
                log.warning("closing a core session failed code=%s", exc.code)

    async def info(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/info")).json()

    async def aclose(self) -> None:
        await self._client.aclose()
