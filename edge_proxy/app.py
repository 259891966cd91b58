"""The edge's HTTP surface: OpenAI-compatible models and chat completions, health and metrics."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import anyio
from litestar import Litestar, Request, Response, get, post
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from admin.api import admin_router, me_route
from admin.console.router import console_router
from admin.plane import PolicyPlane, build_plane
from admin.principal import Scope
from admin.ratelimit import rate_limit_headers
from edge_proxy import openai_shapes as shapes
from edge_proxy.admission import SessionShare
from edge_proxy.completions_route import completions
from edge_proxy.compute import ComputeThread
from edge_proxy.core_client import CoreTransport, transport_from_settings
from edge_proxy.core_health import core_health_probe
from edge_proxy.edge_model import EdgeModel
from edge_proxy.gatekeeper import Admission, Gatekeeper
from edge_proxy.generate import Engine
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.openapi_chat import ChatOperation
from edge_proxy.prepare import prepare
from edge_proxy.respond import ChatResponder
from edge_proxy.responses_route import responses
from edge_proxy.routing import EdgeState, admitted, check_model, principal_for
from edge_proxy.schemas import parse_chat_request
from veil.errors import VeilError
from veil.http import EXCEPTION_HANDLERS
from veil.openapi import AUTHENTICATED, WITH_PATH, documented
from veil.settings import Settings

log = logging.getLogger("veil.edge")
_CORE_DOWN = {502: "the core answered something invalid", 503: "the core is unreachable or serves another bundle",
              504: "the core did not answer in time"}


def _model_object(state: EdgeState) -> dict[str, Any]:
    return {"id": state.settings.model.name, "object": "model", "created": 0, "owned_by": "veil"}


@get("/v1/models", operation_class=documented(AUTHENTICATED), summary="List the models")
async def list_models(request: Request, state: EdgeState) -> dict[str, Any]:
    await principal_for(request, state, Scope.READ)
    return {"object": "list", "data": [_model_object(state)]}


@get("/v1/models/{model_id:str}", operation_class=documented(AUTHENTICATED, WITH_PATH),
     summary="Show one model")
async def get_model(request: Request, model_id: str, state: EdgeState) -> dict[str, Any]:
    await principal_for(request, state, Scope.READ)
    check_model(state, model_id)
    return _model_object(state)


@post("/v1/chat/completions", status_code=200, operation_class=ChatOperation,
      summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request[Any, Any, EdgeState], state: EdgeState) -> Response[Any]:
    return await admitted(request, state, lambda admission, rid, started: _chat(request, state, admission, rid,
                                                                                  started))


async def _chat(request: Request[Any, Any, EdgeState], state: EdgeState, admission: Admission, rid: str,
                started: float) -> Response[Any]:
    # parse off the event loop: the body may be megabytes of JSON
    body = await request.body()
    chat = await anyio.to_thread.run_sync(parse_chat_request, body, state.model.vocab_size)
    check_model(state, chat.model)
    await state.engine.connect()
    # prepare: policy, template and budget; then reserve the worst case against the key's tpm
    gens = await prepare(state.gate, state.engine, state.model, state.settings.privacy, admission.principal, chat,
                         rid, started)
    await state.gate.reserve(admission, gens[0].prompt_tokens + sum(g.max_new_tokens for g in gens), rid)
    # run and respond; from here the responder releases the admission however the request ends
    ids = shapes.ChatIds(f"chatcmpl-{secrets.token_hex(12)}", chat.model, f"fp_veil_{state.model.spec.bundle_id[:8]}")
    headers = {"x-request-id": rid, **rate_limit_headers(admission.decision)}
    responder = ChatResponder(state.engine, state.gate, state.metrics, admission, chat, gens, ids, headers)
    return await responder.respond()


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", operation_class=documented(_CORE_DOWN), summary="Ready: the core answers for our bundle")
async def readyz(state: EdgeState) -> dict[str, str]:
    await state.engine.connect()
    return {"status": "ready"}


@get("/metrics", media_type="text/plain", operation_class=documented(AUTHENTICATED),
     summary="Prometheus metrics")
async def metrics(request: Request, state: EdgeState) -> Response[bytes]:
    """Prometheus metrics, for a key with the `metrics` scope (or admin) when auth is on."""
    await principal_for(request, state, Scope.METRICS)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _sessions(settings: Settings) -> SessionShare:
    e = settings.edge
    return SessionShare(e.max_sessions, per_key=e.max_concurrent_per_key or None, share=e.key_session_share,
                        wait_s=e.admission_wait_seconds)


def create_app(settings: Settings, model: EdgeModel, core: CoreTransport | None = None,
               plane: PolicyPlane | None = None, compute: ComputeThread | None = None) -> Litestar:
    """The edge app; `core` defaults to the sealed transport to `edge.core_url` (tests may pass another);
    `compute` is the thread that loaded `model`, else a new one."""
    edge_metrics = EdgeMetrics()
    transport = core or transport_from_settings(settings, edge_metrics)
    plane = plane or build_plane(settings)
    engine = Engine(model, transport, edge_metrics, settings.edge.default_max_tokens,
                    speculative_tokens=settings.edge.speculative_tokens, compute=compute)
    state = EdgeState({"settings": settings, "model": model, "core": transport, "engine": engine,
                       "metrics": edge_metrics, "plane": plane,
                       "gate": Gatekeeper(plane, edge_metrics, _sessions(settings), settings.privacy.ner_model),
                       "auth": plane.auth, "policy": plane.policy, "audit": plane.audit,
                       "usage": plane.usage, "console": plane.console,
                       "core_health": core_health_probe(settings, engine)})

    async def on_startup(app: Litestar) -> None:
        try:
            await engine.connect()
        except VeilError as exc:
            log.warning("core not verified at start-up code=%s; will retry per request", exc.code)
        try:  # build the recognizers of the protect rules now, not on the first request
            await anyio.to_thread.run_sync(state.gate.detector)
        except VeilError as exc:
            log.warning("span protection not ready at start-up code=%s", exc.code)

    async def on_shutdown(app: Litestar) -> None:
        engine.close()
        await transport.aclose()
        await plane.aclose()

    return Litestar(
        route_handlers=[list_models, get_model, chat_completions, healthz, readyz, metrics, admin_router, me_route,
                        responses, completions, console_router],
        state=state,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.edge.max_request_bytes,
        logging_config=None,
        debug=False,
    )
