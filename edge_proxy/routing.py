"""What every generation route shares: the app's typed state, the request id, the guard, and admission.

A generation route (chat, legacy completions, responses) is: who asks (401/403) -> a declared body over
the limit (413) -> admission (rpm, a core session; before the body is read) -> the route's own work. The
admission is released however that work ends; once a responder holds it, the responder releases it.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Awaitable, Callable

import anyio
from litestar import Request, Response
from litestar.datastructures import State

from admin.plane import PolicyPlane
from admin.principal import Principal, Scope
from edge_proxy.core_client import CoreTransport
from edge_proxy.edge_model import EdgeModel
from edge_proxy.gatekeeper import Admission, Gatekeeper
from edge_proxy.generate import Engine
from edge_proxy.metrics import EdgeMetrics
from veil.errors import NotFound, PayloadTooLarge
from veil.settings import Settings

_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EdgeState(State):
    settings: Settings
    model: EdgeModel
    core: CoreTransport
    engine: Engine
    metrics: EdgeMetrics
    plane: PolicyPlane
    gate: Gatekeeper
    # the admin API reads these straight off the state
    auth: Any
    policy: Any
    audit: Any
    usage: Any
    # the console's sign-ins and its view of the core
    console: Any
    core_health: Any


def check_model(state: EdgeState, model_id: str) -> None:
    if model_id != state.settings.model.name:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


def request_id(request: Request) -> str:
    rid = request.scope.get("state", {}).get("request_id")
    if rid is None:
        rid = request.headers.get("x-request-id", "")
        rid = rid if _RID.match(rid) else secrets.token_hex(8)
        request.scope.setdefault("state", {})["request_id"] = rid
    return rid


async def principal_for(request: Request, state: EdgeState, scope: Scope) -> Principal:
    return await state.gate.principal(request.headers, scope, request_id(request), request.url.path)


def check_declared_size(request: Request, limit: int) -> None:
    """A body declared over the limit is refused before anything is spent on it (the read enforces it too)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")


Work = Callable[[Admission, str, float], Awaitable[Response[Any]]]


async def admitted(request: Request, state: EdgeState, work: Work) -> Response[Any]:
    """Guard and admit a generation request, then run `work(admission, request id, start time)`."""
    started, rid = time.perf_counter(), request_id(request)
    principal = await principal_for(request, state, Scope.GENERATE)
    check_declared_size(request, state.settings.edge.max_request_bytes)
    admission = await state.gate.admit(principal, rid)
    try:
        return await work(admission, rid, started)
    except BaseException:
        with anyio.CancelScope(shield=True):  # refused before it ran (or the client left): free what it holds
            await state.gate.release(admission, 0)
        raise
