"""The edge's HTTP surface: OpenAI-compatible models and chat completions, health and metrics."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any, AsyncIterator

import anyio
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from admin.api import admin_router, me_route
from admin.plane import PolicyPlane, build_plane
from admin.principal import Principal, Scope
from admin.ratelimit import rate_limit_headers
from edge_proxy import openai_shapes as shapes
from edge_proxy.chat_template import render_prompt, render_with_positions
from edge_proxy.core_client import CoreTransport, HttpCoreTransport
from edge_proxy.edge_model import EdgeModel
from edge_proxy.gatekeeper import Gatekeeper
from edge_proxy.generate import Completion, Engine
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.outgoing import NoiseSpec, SpanNoise
from edge_proxy.schemas import parse_chat_request
from edge_proxy.spans.restore import PlaceholderRestorer
from veil.errors import NotFound, ServiceUnavailable, VeilError
from veil.http import EXCEPTION_HANDLERS
from veil.settings import Settings

log = logging.getLogger("veil.edge")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EdgeState(State):
    settings: Settings
    model: EdgeModel
    core: CoreTransport
    engine: Engine | None
    metrics: EdgeMetrics
    core_verified: bool
    plane: PolicyPlane
    gate: Gatekeeper
    # the admin API reads these three straight off the state
    auth: Any
    policy: Any
    audit: Any


async def _verify_core(state: EdgeState) -> Engine:
    """Check once that the core serves the bundle our Q belongs to; size the context from its limits."""
    if state.engine is not None and state.core_verified:
        return state.engine
    info = await state.core.info()
    if info.get("bundle_id") != state.model.spec.bundle_id:
        raise ServiceUnavailable("the core serves a different cloaked bundle than this edge holds; "
                                 "deploy the core bundle written with this edge bundle", code="bundle_mismatch")
    limit = min(state.model.spec.max_positions, int(info.get("max_tokens_per_session", 0)) or 1 << 30)
    state.engine = Engine(state.model, state.core, limit, state.metrics, state.settings.edge.default_max_tokens)
    state.core_verified = True
    log.info("core verified context_limit=%d", limit)
    return state.engine


def _model_object(state: EdgeState) -> dict[str, Any]:
    return {"id": state.settings.model.name, "object": "model", "created": 0, "owned_by": "veil"}


def _request_id(request: Request) -> str:
    rid = request.scope.get("state", {}).get("request_id")
    if rid is None:
        rid = request.headers.get("x-request-id", "")
        rid = rid if _RID.match(rid) else secrets.token_hex(8)
        request.scope.setdefault("state", {})["request_id"] = rid
    return rid


async def _principal(request: Request, state: EdgeState, scope: Scope) -> Principal:
    return await state.gate.principal(request.headers, scope, _request_id(request), request.url.path)


@get("/v1/models")
async def list_models(request: Request, state: EdgeState) -> dict[str, Any]:
    await _principal(request, state, Scope.READ)
    return {"object": "list", "data": [_model_object(state)]}


@get("/v1/models/{model_id:str}")
async def get_model(request: Request, model_id: str, state: EdgeState) -> dict[str, Any]:
    await _principal(request, state, Scope.READ)
    if model_id != state.settings.model.name:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_object(state)


@post("/v1/chat/completions")
async def chat_completions(request: Request[Any, Any, EdgeState], state: EdgeState) -> Response[Any]:
    started = time.perf_counter()
    rid = _request_id(request)
    principal = await _principal(request, state, Scope.GENERATE)
    chat = parse_chat_request(await request.body(), state.model.vocab_size)
    if chat.model != state.settings.model.name:
        raise NotFound(f"The model '{chat.model}' does not exist", param="model", code="model_not_found")
    engine = await _verify_core(state)
    prompt_ids = render_prompt(state.model.tokenizer, chat.messages)
    max_new = engine.budget(len(prompt_ids), chat.max_tokens)
    decision = await state.gate.admit(principal, len(prompt_ids) + max_new, rid)
    privacy = state.settings.privacy
    span_noise, restorer = None, None
    try:
        messages = state.gate.guard_prompt(principal, chat.messages, rid) or chat.messages
        protected = await anyio.to_thread.run_sync(state.gate.protect_prompt, principal, messages, rid)
        if protected is not None:
            prompt_ids, positions = render_with_positions(state.model.tokenizer, protected.messages, protected.noisy)
            span_noise = SpanNoise(positions, privacy.span_noise_rho) if positions else None
            restorer = PlaceholderRestorer(protected.mapping) if protected.mapping else None
        elif messages is not chat.messages:
            prompt_ids = render_prompt(state.model.tokenizer, messages)
        done = Completion(len(prompt_ids), engine.budget(len(prompt_ids), chat.max_tokens))
    except VeilError:
        await state.gate.settle(principal, rid, 0)  # refused before the core saw anything: release the reservation
        raise
    ids = shapes.ChatIds(f"chatcmpl-{secrets.token_hex(12)}", chat.model, f"fp_veil_{state.model.spec.bundle_id[:8]}")
    noise = NoiseSpec(rho=privacy.noise_rho if principal.noise_rho is None else principal.noise_rho,
                      clip=privacy.noise_clip or None)
    generated = engine.run(prompt_ids, chat.sampling, chat.stop, done, rid, noise, span_noise, restorer)
    deltas = state.gate.guard_output(principal, generated, done, rid)
    headers = {"x-request-id": rid, **rate_limit_headers(decision)}

    async def finished(status: str) -> None:
        await state.gate.settle(principal, rid, done.prompt_tokens + done.completion_tokens)
        m = state.metrics
        if restorer is not None:
            m.placeholders.labels(outcome="restored").inc(restorer.restored)
            m.placeholders.labels(outcome="mangled").inc(restorer.mangled)
        m.requests.labels(status=status).inc()
        m.prompt_tokens.inc(done.prompt_tokens)
        m.completion_tokens.inc(done.completion_tokens)
        elapsed = time.perf_counter() - started
        ttft = (done.first_token_at - started) if done.first_token_at else elapsed
        if done.first_token_at:
            m.ttft.observe(ttft)
        log.info("chat rid=%s status=%s stream=%s prompt_tokens=%d completion_tokens=%d finish=%s "
                 "ttft_ms=%.1f total_ms=%.1f", rid, status, chat.stream, done.prompt_tokens,
                 done.completion_tokens, done.finish_reason, ttft * 1000, elapsed * 1000)

    if not chat.stream:
        try:
            text = "".join([piece async for piece in deltas])
        except VeilError as exc:
            await finished(str(exc.status_code))
            raise
        await finished("200")
        return Response(shapes.completion_object(ids, text, done), headers=headers)

    # Run the prefill before answering 200, so a dead core is a 503 rather than a broken stream.
    try:
        first = await anext(deltas, None)
    except VeilError as exc:
        await finished(str(exc.status_code))
        raise

    async def events() -> AsyncIterator[bytes]:
        status = "200"
        try:
            yield shapes.chunk(ids, {"role": "assistant", "content": "", "refusal": None}, None, chat.include_usage)
            if first is not None:
                yield shapes.chunk(ids, {"content": first}, None, chat.include_usage)
                async for piece in deltas:
                    yield shapes.chunk(ids, {"content": piece}, None, chat.include_usage)
            yield shapes.chunk(ids, {}, done.finish_reason, chat.include_usage)
            if chat.include_usage:
                yield shapes.usage_chunk(ids, done)
        except VeilError as exc:
            status = str(exc.status_code)
            yield shapes.error_event(exc)
        except BaseException:
            status = "disconnected"  # client went away (cancellation) or the server is stopping
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await deltas.aclose()
                await finished(status)
        yield shapes.DONE

    return Stream(events(), media_type="text/event-stream",
                  headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(state: EdgeState) -> dict[str, str]:
    await _verify_core(state)
    return {"status": "ready"}


@get("/metrics")
async def metrics(state: EdgeState) -> Response[bytes]:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, model: EdgeModel, core: CoreTransport | None = None,
               plane: PolicyPlane | None = None) -> Litestar:
    """The edge app; `core` defaults to pooled HTTP to `edge.core_url` (tests may pass another transport)."""
    transport = core or HttpCoreTransport(settings.edge.core_url, settings.edge.core_timeout_seconds,
                                          settings.edge.core_connections)
    plane = plane or build_plane(settings)
    edge_metrics = EdgeMetrics()
    state = EdgeState({"settings": settings, "model": model, "core": transport, "engine": None,
                       "metrics": edge_metrics, "core_verified": False, "plane": plane,
                       "gate": Gatekeeper(plane, edge_metrics, settings.privacy.ner_model),
                       "auth": plane.auth, "policy": plane.policy, "audit": plane.audit})

    async def on_startup(app: Litestar) -> None:
        try:
            await _verify_core(state)
        except VeilError as exc:
            log.warning("core not verified at start-up code=%s; will retry per request", exc.code)
        try:  # build the recognizers of the protect rules now, not on the first request
            await anyio.to_thread.run_sync(state.gate.detector)
        except VeilError as exc:
            log.warning("span protection not ready at start-up code=%s", exc.code)

    async def on_shutdown(app: Litestar) -> None:
        await transport.aclose()
        await plane.aclose()

    return Litestar(
        route_handlers=[list_models, get_model, chat_completions, healthz, readyz, metrics, admin_router, me_route],
        state=state,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.edge.max_request_bytes,
        logging_config=None,
        debug=False,
    )
