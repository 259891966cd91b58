"""The core's HTTP surface: binary step API, session close, health, readiness and metrics."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core_server.memory import AUTO_SHARE, free_bytes, plan_kv
from core_server.metrics import CoreMetrics
from core_server.scheduler import StepScheduler
from core_server.sessions import SessionTable
from veil import wire
from veil.errors import Conflict, NotFound, PayloadTooLarge, ServiceUnavailable, VeilError
from veil.http import EXCEPTION_HANDLERS
from veil.model.decoder import DecoderStack
from veil.settings import Settings

log = logging.getLogger("veil.core")


class CoreState(State):
    """Typed app state: filled in by the loader thread once the bundle is in memory."""

    settings: Settings
    metrics: CoreMetrics
    scheduler: StepScheduler | None
    load_error: str | None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VeilError("core.device is cuda but no CUDA device is available", code="config_error")
    return torch.device(name)


def _load(state: CoreState) -> None:
    settings = state.settings
    started = time.perf_counter()
    try:
        if settings.core.threads > 0:
            torch.set_num_threads(settings.core.threads)
        device = _device(settings.core.device)
        stack = DecoderStack.load(settings.core_bundle_dir(), device)
        spec, core = stack.spec, settings.core
        max_tokens = min(core.max_tokens_per_session, spec.max_positions)
        sessions = plan_kv(layers=spec.num_layers, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=stack.dtype,
                       max_tokens=max_tokens, max_sessions=core.max_sessions,
                       budget_bytes=core.kv_budget_bytes or int(AUTO_SHARE * free_bytes(device)))
        table = SessionTable(stack.new_session, max_sessions=sessions, max_tokens=max_tokens,
                             idle_seconds=core.session_idle_seconds)
        scheduler = StepScheduler(stack, table, state.metrics, core.max_batch_tokens,
                                  max_queued=core.max_queued_steps)
        scheduler.start()
        state.scheduler = scheduler
        state.metrics.ready.set(1)
        log.info("core ready layers=%d dim=%d device=%s load_s=%.1f", spec.num_layers, spec.hidden_size,
                 device, time.perf_counter() - started)
    except VeilError as exc:
        state.load_error = f"the core failed to start: {exc.message}"
        log.error("core failed to start: %s", exc.message)
    except Exception as exc:  # anything else (out of memory, a driver error) must not look like "still loading"
        state.load_error = f"the core failed to start ({type(exc).__name__}); see its log"
        log.error("core failed to start error=%s", type(exc).__name__, exc_info=True)


def _scheduler(state: CoreState) -> StepScheduler:
    if state.load_error is not None:
        raise ServiceUnavailable(state.load_error, code="load_failed")
    if state.scheduler is None:
        raise ServiceUnavailable("the core is still loading its bundle", code="not_ready")
    if state.scheduler.failure is not None:
        raise ServiceUnavailable(state.scheduler.failure, code="runner_failed")
    return state.scheduler


@post("/v1/step", status_code=200)
async def step(request: Request[Any, Any, CoreState], state: CoreState) -> Response[bytes]:
    scheduler = _scheduler(state)
    body = await request.body()
    if len(body) > state.settings.core.max_step_bytes:
        raise PayloadTooLarge(f"step body exceeds max_step_bytes={state.settings.core.max_step_bytes}")
    req = wire.decode_request(body)
    if len(req.want) > state.settings.core.max_result_rows:
        raise PayloadTooLarge(f"a step may ask for at most max_result_rows={state.settings.core.max_result_rows} rows",
                              code="result_rows_limit")
    if req.bundle_id != scheduler.stack.spec.bundle_id:
        raise Conflict("the step is for another cloaked bundle than this core serves", code="bundle_mismatch")
    result = await scheduler.submit(req)
    log.info("step rid=%s rows_in=%d rows_out=%d bytes_in=%d queue_ms=%.2f compute_ms=%.2f",
             req.request_id, req.hidden.shape[0], result.hidden.shape[0], len(body), result.queue_ms,
             result.compute_ms)
    return Response(wire.encode_result(result), media_type=wire.CONTENT_TYPE)


@delete("/v1/sessions/{session_id:str}", status_code=204)
async def close_session(session_id: str, state: CoreState) -> None:
    if not _scheduler(state).table.close(session_id):
        raise NotFound("unknown session", code="session_not_found")


@get("/v1/info")
async def info(state: CoreState) -> dict[str, Any]:
    """What the edge checks before sending anything: the bundle id and the limits."""
    scheduler = _scheduler(state)
    spec = scheduler.stack.spec
    return {
        "bundle_id": spec.bundle_id,
        "architecture": spec.architecture,
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "max_sessions": scheduler.table.max_sessions,
        "max_tokens_per_session": scheduler.table.max_tokens,
        "device": str(scheduler.stack.device),
    }


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(state: CoreState) -> dict[str, str]:
    _scheduler(state)
    return {"status": "ready"}


@get("/metrics")
async def metrics(state: CoreState) -> Response[bytes]:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings) -> Litestar:
    state = CoreState({"settings": settings, "metrics": CoreMetrics(), "scheduler": None, "load_error": None})

    def on_startup(app: Litestar) -> None:
        # Load in the background so /healthz answers and /readyz says 503 while weights load.
        threading.Thread(target=_load, args=(state,), name="veil-core-loader", daemon=True).start()

    def on_shutdown(app: Litestar) -> None:
        if state.scheduler is not None:
            state.scheduler.stop()

    return Litestar(
        route_handlers=[step, close_session, info, healthz, readyz, metrics],
        state=state,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.core.max_step_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
