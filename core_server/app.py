"""The core's HTTP surface: handshake, sealed steps and close for enrolled edges; health, readiness, info.

Everything but /healthz, /readyz and /v1/info needs a session's keys: a hello that only an
enrolled edge can write opens a session, and every later call is a frame sealed under it.
Prometheus metrics are served on their own address (core.metrics_port), not here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import State

from core_server.engine import CoreEngine, NativeEngine, kv_bytes_per_token
from core_server.enrollment import Edge, load_allowed_edges
from core_server.locker import Locker, locker_from_settings
from core_server.memory import AUTO_SHARE, free_bytes, plan_kv
from core_server.metrics import CoreMetrics
from core_server.replays import ReplayGuard
from core_server.scheduler import StepScheduler
from core_server.sessions import Held, SessionTable
from veil import wire
from veil.bundle import read_core_spec
from veil.channel import open_hello
from veil.errors import (
    AuthenticationFailed,
    ConfigError,
    Conflict,
    InvalidRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    VeilError,
)
from veil.http import EXCEPTION_HANDLERS
from veil.identity import CoreIdentity, load_private_key
from veil.model.decoder import DecoderStack
from veil.settings import Settings

log = logging.getLogger("veil.core")


class CoreState(State):
    """Typed app state: identity and enrollment from the start, the scheduler once the bundle is in memory."""

    settings: Settings
    metrics: CoreMetrics
    identities: list[CoreIdentity]  # the current key first; the previous one too during a rotation
    edges: dict[bytes, Edge]
    locker: Locker | None
    replays: ReplayGuard
    scheduler: StepScheduler | None
    load_error: str | None
    draining: bool


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise VeilError("core.device is cuda but no CUDA device is available", code="config_error")
    return torch.device(name)


CPU_VLLM_SHARE = 0.25  # vLLM allocates its whole KV cache at start: on a CPU it shares the host with everything else


def _kv_budget(settings: Settings, device: torch.device, worst_case: int) -> int:
    """core.kv_budget_bytes, else the worst case, capped at 90% of a GPU's free memory or a quarter of the host's."""
    if settings.core.kv_budget_bytes:
        return settings.core.kv_budget_bytes
    share = AUTO_SHARE if device.type == "cuda" else CPU_VLLM_SHARE
    return min(int(share * free_bytes(device)), worst_case)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    """core.dtype: auto is bfloat16 on a GPU (half the memory and twice the speed of float32) and float32 on a CPU
    (the exactness reference; CPUs without bfloat16 units run it slower)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_engine(settings: Settings) -> tuple[CoreEngine, int, int]:
    """The configured engine over the core bundle -> (engine, sessions admitted, tokens per session)."""
    core, bundle_dir = settings.core, settings.core_bundle_dir()
    spec = read_core_spec(bundle_dir)
    max_tokens = min(core.max_tokens_per_session, spec.max_positions)
    if core.engine == "vllm":
        from core_server.vllm_engine import VllmEngine, hf_folder

        # vLLM keeps the KV cache (a prefix cache the sessions' steps refill); a session here holds only its
        # input rows, so the plan sizes vLLM's cache and needs room for one session at its limit
        device = _device(core.device)
        dtype = _dtype(core.dtype, device)
        per_token = kv_bytes_per_token(spec, dtype)
        budget = _kv_budget(settings, device, per_token * max_tokens * core.max_sessions)
        plan_kv(layers=spec.num_layers, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=dtype,
                max_tokens=max_tokens, max_sessions=1, budget_bytes=budget)
        engine: CoreEngine = VllmEngine(
            spec, hf_folder(bundle_dir, Path(settings.home), spec), device=device, dtype=dtype, max_tokens=max_tokens,
            max_sessions=core.max_sessions, kv_bytes=budget, block_rows=core.vllm_block_size,
            tensor_parallel_size=core.tensor_parallel_size, max_batch_tokens=core.max_batch_tokens)
        return engine, core.max_sessions, max_tokens
    device = _device(core.device)
    stack = DecoderStack.load(bundle_dir, device, _dtype(core.dtype, device), quantize=core.quantize)
    sessions = plan_kv(layers=spec.num_layers, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=stack.dtype,
                       max_tokens=max_tokens, max_sessions=core.max_sessions,
                       budget_bytes=core.kv_budget_bytes or int(AUTO_SHARE * free_bytes(device)))
    return NativeEngine(stack, sessions, max_tokens, cuda_graphs=core.cuda_graphs and device.type == "cuda"), \
        sessions, max_tokens


def _load(state: CoreState) -> None:
    settings = state.settings
    started = time.perf_counter()
    try:
        if settings.core.threads > 0:
            torch.set_num_threads(settings.core.threads)
        engine, sessions, max_tokens = load_engine(settings)
        core, spec = settings.core, engine.spec
        bundle_id = spec.bundle_id
        locker = state.locker

        def spill(sid: str, held: Held) -> None:
            assert locker is not None and held.kv is not None and held.locker_key is not None
            locker.put(sid, held.locker_key, bundle_id, held.kv)

        table = SessionTable(engine.new_session, max_sessions=sessions, max_tokens=max_tokens,
                             idle_seconds=core.session_idle_seconds, spill=spill if locker else None,
                             spill_after=core.locker_after_seconds)
        # Chunks only for the native engine: vLLM is handed a step's whole sequence as one request and chunks its
        # prefill itself; chunked here, each chunk would re-send the prefix, and a chunk wanting an early row
        # skips vLLM's prefix cache and recomputes every row before it.
        chunk = core.prefill_chunk_tokens if engine.name == "native" else 0
        scheduler = StepScheduler(engine, table, state.metrics, core.max_batch_tokens,
                                  max_queued=core.max_queued_steps, prefill_chunk_tokens=chunk,
                                  batch_wait_ms=core.batch_wait_ms, batch_groups=core.batch_groups)
        scheduler.start()
        state.scheduler = scheduler
        if isinstance(engine, NativeEngine):
            state.metrics.kv_pool_bytes.set(engine.pool_bytes)
        state.metrics.ready.set(1)
        graphs = isinstance(engine, NativeEngine) and engine.graphs is not None
        log.info("core ready engine=%s layers=%d dim=%d device=%s dtype=%s quantize=%s cuda_graphs=%s load_s=%.1f",
                 engine.name, spec.num_layers, spec.hidden_size, engine.device, str(engine.dtype).removeprefix("torch."),
                 core.quantize, graphs, time.perf_counter() - started)
    except VeilError as exc:
        state.load_error = f"the core failed to start: {exc.message}"
        log.error("core failed to start: %s", exc.message)
    except Exception as exc:  # anything else (out of memory, a driver error) must not look like "still loading"
        state.load_error = f"the core failed to start ({type(exc).__name__}); see its log"
        log.error("core failed to start error=%s", type(exc).__name__, exc_info=True)


def _scheduler(state: CoreState) -> StepScheduler:
    if state.draining:
        raise ServiceUnavailable("the core is shutting down; its sessions went to the locker", code="draining")
    if state.load_error is not None:
        raise ServiceUnavailable(state.load_error, code="load_failed")
    if state.scheduler is None:
        raise ServiceUnavailable("the core is still loading its bundle", code="not_ready")
    if state.scheduler.failure is not None:
        raise ServiceUnavailable(state.scheduler.failure, code="runner_failed")
    return state.scheduler


_BIG_FRAME = 1 << 20  # frames this large are opened off the event loop


async def _open_frame(held: Held, op: str, body: bytes, metrics: CoreMetrics) -> tuple[int, bytes]:
    """(seq, plaintext) of the next authentic frame of `held`'s channel; refused frames change nothing."""
    channel = held.channel
    assert channel is not None
    try:
        seq, plain = (await asyncio.to_thread(channel.peek, op, body)) if len(body) > _BIG_FRAME \
            else channel.peek(op, body)
        channel.accept(seq, final=op == "close")
    except VeilError as exc:
        metrics.frames_refused.labels(reason=str(exc.code)).inc()
        raise
    return seq, plain


def _held(state: CoreState, sid: str) -> Held:
    held = _scheduler(state).table.get(sid)
    if held is None or held.channel is None:
        # the same answer for an unknown id and a session held elsewhere: an id alone grants nothing
        raise AuthenticationFailed("no session with this id is open on this core replica; open one with a "
                                   "handshake", code="session_unknown")
    return held


@post("/v1/sessions", status_code=200)
async def open_session(request: Request[Any, Any, CoreState], state: CoreState) -> Response[bytes]:
    """The handshake: an HPKE-sealed hello from an enrolled edge in, the core's half of the key exchange out."""
    body = await request.body()
    try:
        hello = open_hello(body, state.identities, state.edges)
        state.replays.check(hello.digest)
    except VeilError as exc:
        state.metrics.handshakes.labels(result=str(exc.code)).inc()
        raise
    scheduler = _scheduler(state)
    if hello.bundle_id != scheduler.engine.spec.bundle_id:
        state.metrics.handshakes.labels(result="bundle_mismatch").inc()
        raise Conflict("the session is for another cloaked bundle than this core serves", code="bundle_mismatch")
    edge = state.edges[hello.edge_public]
    reply, channel = hello.accept()
    scheduler.table.open(hello.sid, edge.name, edge.max_sessions, channel, resume=hello.resume)
    state.metrics.handshakes.labels(result="resumed" if hello.resume else "opened").inc()
    return Response(reply, media_type="application/octet-stream")


@post("/v1/sessions/{sid:str}/step", status_code=200)
async def step(sid: str, request: Request[Any, Any, CoreState], state: CoreState) -> Response[bytes]:
    scheduler = _scheduler(state)
    held = _held(state, sid)
    body = await request.body()
    seq, plain = await _open_frame(held, "step", body, state.metrics)
    req = wire.decode_request(plain)
    if req.session != sid:
        raise InvalidRequest("the sealed step names another session than its route")
    if len(req.want) > state.settings.core.max_result_rows:
        raise PayloadTooLarge(f"a step may ask for at most max_result_rows={state.settings.core.max_result_rows} rows",
                              code="result_rows_limit")
    if req.bundle_id != scheduler.engine.spec.bundle_id:
        raise Conflict("the step is for another cloaked bundle than this core serves", code="bundle_mismatch")
    scheduler.table.use(held, +1)
    try:
        if req.locker_key is not None:
            held.locker_key = req.locker_key
        if held.kv is None and req.offset > 0 and state.locker is not None and held.locker_key is not None:
            held.kv = await asyncio.to_thread(state.locker.take, sid, held.locker_key, req.bundle_id,
                                              scheduler.engine.new_session(scheduler.table.max_tokens))
        result = await scheduler.submit(req)
    finally:
        scheduler.table.use(held, -1)
    log.debug("step rid=%s rows_in=%d rows_out=%d bytes_in=%d queue_ms=%.2f compute_ms=%.2f",
             req.request_id, req.hidden.shape[0], result.hidden.shape[0], len(body), result.queue_ms,
             result.compute_ms)
    assert held.channel is not None
    return Response(held.channel.seal("step", wire.encode_result(result), seq=seq), media_type=wire.CONTENT_TYPE)


@delete("/v1/sessions/{sid:str}", status_code=204)
async def close_session(sid: str, request: Request[Any, Any, CoreState], state: CoreState) -> None:
    held = _held(state, sid)
    await _open_frame(held, "close", await request.body(), state.metrics)
    table = _scheduler(state).table
    if table.close(sid) is not None and state.locker is not None and held.locker_key is not None:
        await asyncio.to_thread(state.locker.discard, sid, held.locker_key)


@get("/v1/info")
async def info(state: CoreState) -> dict[str, Any]:
    """The public part: who the core is (its keys) and what it serves; edges check it before a handshake."""
    scheduler = _scheduler(state)
    spec = scheduler.engine.spec
    return {
        "protocol": "veil/1",
        "identity": state.identities[0].info(),
        "identities": [i.info() for i in state.identities],
        "kems": ["x25519", "mlkem768-x25519"],
        "bundle_id": spec.bundle_id,
        "hidden_size": spec.hidden_size,
        "max_tokens_per_session": scheduler.table.max_tokens,
        "max_result_rows": state.settings.core.max_result_rows,
        "verifies_drafts": scheduler.engine.verifies_drafts,
    }


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz")
async def readyz(state: CoreState) -> dict[str, str]:
    _scheduler(state)
    return {"status": "ready"}


def drain(state: CoreState) -> int:
    """Stop taking steps, finish the batch in hand and put every session that can go into the locker.
    Called on SIGTERM before the server stops, so that a rolling update loses no session."""
    if state.draining:
        return 0
    state.draining = True
    scheduler = state.scheduler
    if scheduler is None:
        return 0
    scheduler.stop()
    spilled = 0
    for sid, held in scheduler.table.drain():
        if state.locker is not None and held.kv is not None and held.locker_key is not None:
            state.locker.put(sid, held.locker_key, scheduler.engine.spec.bundle_id, held.kv)
            spilled += 1
    if state.locker is not None:
        state.locker.flush()
    log.info("core drained sessions_to_locker=%d", spilled)
    return spilled


def _identities(settings: Settings) -> list[CoreIdentity]:
    path = settings.core_identity_path()
    if not path.exists():
        raise ConfigError(f"the core has no identity key at {path}; make one with `veil core keygen`")
    keys = [CoreIdentity.from_key(load_private_key(path))]
    if settings.core.previous_identity_key_file:  # a rotation's overlap: edges that pin the old key still get in
        keys.append(CoreIdentity.from_key(load_private_key(Path(settings.core.previous_identity_key_file))))
    return keys


def create_app(settings: Settings) -> Litestar:
    metrics = CoreMetrics()
    locker = locker_from_settings(settings, metrics)
    state = CoreState({"settings": settings, "metrics": metrics, "identities": _identities(settings),
                       "edges": load_allowed_edges(settings.allowed_edges_path(), settings.core.max_sessions),
                       "locker": locker, "replays": ReplayGuard(locker.client if locker else None),
                       "scheduler": None, "load_error": None, "draining": False})

    def on_startup(app: Litestar) -> None:
        # Load in the background so /healthz answers and /readyz says 503 while weights load.
        threading.Thread(target=_load, args=(state,), name="veil-core-loader", daemon=True).start()

    def on_shutdown(app: Litestar) -> None:
        drain(state)
        if state.locker is not None:
            state.locker.close()

    return Litestar(
        route_handlers=[open_session, step, close_session, info, healthz, readyz],
        state=state,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.core.max_step_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
