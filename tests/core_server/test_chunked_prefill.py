"""Chunked prefill: a long step runs in chunks beside other sessions' steps and returns what it would have whole."""

from __future__ import annotations

import concurrent.futures
import time
import types

import httpx
import pytest
import torch
from litestar.testing import TestClient

from cloaking.secretbox import KeySource
from core_server import app as core_app
from core_server.engine import NativeEngine
from core_server.metrics import CoreMetrics
from core_server.scheduler import StepScheduler
from core_server.sessions import SessionTable
from edge_proxy.edge_model import EdgeModel
from tests.core_server.test_scheduler import DIM, Clock, RecordingEngine
from tests.test_parity import PROMPTS, _check_pair
from veil.errors import ConfigError, Conflict, NotFound, VeilError
from veil.identity import load_or_create
from veil.model.decoder import DecoderStack
from veil.settings import load_settings
from veil.wire import StepRequest
from veil_cli.processes import VeilPair

LIMIT = 64


def _scheduler(engine, chunk: int, budget: int = 16) -> StepScheduler:
    table = SessionTable(engine.new_session, max_sessions=8, max_tokens=LIMIT, idle_seconds=30, clock=Clock())
    for s in "abcde":  # as the handshakes of five sessions do
        table.open(s * 16, "edge", 8, None)
    return StepScheduler(engine, table, CoreMetrics(), max_batch_tokens=budget, clock=Clock(),
                         prefill_chunk_tokens=chunk)


def _req(session: str, offset: int, hidden: torch.Tensor, want: list[int] | None = None) -> StepRequest:
    return StepRequest(session * 16, offset, hidden, want or [-1], bundle_id="b" * 32)


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n * DIM, dtype=torch.float32).view(n, DIM)


def _sample(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _drain(scheduler: StepScheduler) -> int:
    """Run batches until the queue is empty -> batches run."""
    batches = 0
    while scheduler.tick():
        batches += 1
    return batches


# -- exactness on a real model ---------------------------------------------------------------------------------

WANTS = [[-1], list(range(29)), [-3, 0, -1, 2, 0], [1]]  # last row, all rows, negatives and repeats, first chunk


@pytest.fixture(scope="module")
def stacks(tiny_bundles) -> dict[str, DecoderStack]:
    return {arch: DecoderStack.load(tiny_bundles[arch][2], torch.device("cpu")) for arch in ("llama", "mistral")}


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # the Mistral model's window (16) is shorter than the prompt
@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 29, 40])  # 7 does not divide 29; 29 and 40 run it whole
def test_a_chunked_prefill_returns_what_the_whole_step_returns(stacks, arch: str, chunk: int) -> None:
    stack = stacks[arch]
    whole = _scheduler(NativeEngine(stack, 8, LIMIT), 0, budget=LIMIT)
    chunked = _scheduler(NativeEngine(stack, 8, LIMIT), chunk, budget=LIMIT)
    gen = torch.Generator().manual_seed(chunk)
    d = stack.spec.hidden_size
    for sid, want in zip("abcd", WANTS):
        prompt, token = torch.randn(29, d, generator=gen), torch.randn(1, d, generator=gen)
        results = []
        for scheduler in (whole, chunked):
            first = scheduler.enqueue(_req(sid, 0, prompt, want))
            chunks = 1 if scheduler is whole or chunk >= 29 else -(-29 // chunk)
            assert _drain(scheduler) == chunks
            then = scheduler.enqueue(_req(sid, 29, token))
            _drain(scheduler)
            results.append((first.result(timeout=0), then.result(timeout=0)))
        (ref, ref_next), (got, got_next) = results
        assert got.length == ref.length == 29 and got_next.length == ref_next.length == 30
        assert got.hidden.dtype == torch.float32 and got.hidden.shape == (len(want), d)
        assert torch.allclose(got.hidden, ref.hidden, atol=1e-4, rtol=1e-4), float((got.hidden - ref.hidden).abs().max())
        assert torch.allclose(got_next.hidden, ref_next.hidden, atol=1e-4, rtol=1e-4)


def test_chunks_beside_other_sessions_decodes_stay_exact(stacks) -> None:
    """Each chunk shares a batch with a decode; the 1-row last chunk joins the decodes' pooled attention."""
    stack = stacks["llama"]
    d = stack.spec.hidden_size
    gen = torch.Generator().manual_seed(7)
    warm, prompt, tokens = torch.randn(5, d, generator=gen), torch.randn(29, d, generator=gen), \
        torch.randn(5, 1, d, generator=gen)
    results = []
    for chunk in (0, 7):  # 29 = 4 * 7 + 1
        scheduler = _scheduler(NativeEngine(stack, 8, LIMIT), chunk, budget=LIMIT)
        scheduler.enqueue(_req("b", 0, warm))
        _drain(scheduler)
        prefill = scheduler.enqueue(_req("a", 0, prompt, [0, 10, -1]))
        decodes = []
        for i in range(5):
            decodes.append(scheduler.enqueue(_req("b", 5 + i, tokens[i])))
            taken = scheduler.tick()
            assert taken == 2 or not chunk  # chunked, every batch holds a chunk and a decode
        _drain(scheduler)
        results.append((prefill.result(timeout=0).hidden, torch.cat([f.result(timeout=0).hidden for f in decodes])))
    (ref_prefill, ref_decodes), (got_prefill, got_decodes) = results
    assert torch.allclose(got_prefill, ref_prefill, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got_decodes, ref_decodes, atol=1e-4, rtol=1e-4)


# -- batching --------------------------------------------------------------------------------------------------


def test_a_decode_of_another_session_finishes_before_the_prefill_s_last_chunk() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4)
    scheduler.enqueue(_req("b", 0, _rows(2)))
    scheduler.tick()
    finished: list[str] = []
    prefill = scheduler.enqueue(_req("a", 0, _rows(10)))
    decode = scheduler.enqueue(_req("b", 2, _rows(1)))
    prefill.add_done_callback(lambda _: finished.append("prefill"))
    decode.add_done_callback(lambda _: finished.append("decode"))
    assert _drain(scheduler) == 3
    assert engine.batches[1:] == [[(0, 4), (2, 1)], [(4, 4)], [(8, 2)]]
    assert finished == ["decode", "prefill"]


def test_the_rest_of_a_chunked_step_goes_first_and_a_chunk_counts_its_own_rows() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4, budget=8)
    futures = [scheduler.enqueue(_req(s, 0, _rows(n))) for s, n in (("a", 10), ("b", 4), ("c", 4), ("d", 4))]
    _drain(scheduler)
    assert engine.batches == [[(0, 4), (0, 4)], [(4, 4), (0, 4)], [(8, 2), (0, 4)]]
    assert [f.result(timeout=0).length for f in futures] == [10, 4, 4, 4]


def test_no_step_of_a_session_overtakes_its_step_in_chunks() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4)
    first = scheduler.enqueue(_req("a", 0, _rows(10)))
    second = scheduler.enqueue(_req("a", 10, _rows(1)))
    other = scheduler.enqueue(_req("c", 0, _rows(2)))
    _drain(scheduler)
    assert engine.batches == [[(0, 4), (0, 2)], [(4, 4)], [(8, 2)], [(10, 1)]]
    assert first.result(timeout=0).length == 10 and second.result(timeout=0).length == 11
    assert other.result(timeout=0).length == 2


def test_wanted_rows_are_gathered_across_chunks_and_tokens_count_as_prefill() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=3)
    x = _rows(10)
    fut = scheduler.enqueue(_req("a", 0, x, want=[0, -1, 5, -6, 5]))
    assert _drain(scheduler) == 4  # 3 + 3 + 3 + 1 rows
    result = fut.result(timeout=0)
    assert result.length == 10 and torch.equal(result.hidden, 2 * x[[0, 9, 5, 4, 5]])
    assert result.compute_ms >= 0 and result.queue_ms >= 0
    registry = scheduler.metrics.registry
    assert registry.get_sample_value("veil_core_tokens_total", {"kind": "prefill"}) == 10
    assert registry.get_sample_value("veil_core_tokens_total", {"kind": "decode"}) is None


def test_zero_runs_every_step_whole() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=0)
    fut = scheduler.enqueue(_req("a", 0, _rows(40)))
    assert _drain(scheduler) == 1 and engine.batches == [[(0, 40)]]
    assert fut.result(timeout=0).length == 40


# -- failure and cancellation ----------------------------------------------------------------------------------


def _length(scheduler: StepScheduler, session: str) -> int:
    held = scheduler.table.get(session * 16)
    assert held is not None and held.kv is not None
    return held.kv.length


def test_a_failed_chunk_fails_the_step_once_and_leaves_the_session_as_before() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4)
    scheduler.enqueue(_req("a", 0, _rows(3)))
    scheduler.tick()
    doomed = scheduler.enqueue(_req("a", 3, _rows(10)))
    scheduler.tick()
    assert _length(scheduler, "a") == 7 and not doomed.done()  # the first chunk is in
    engine.fail_next = True
    scheduler.tick()
    exc = doomed.exception(timeout=0)
    assert isinstance(exc, VeilError) and exc.code == "forward_failed"
    assert _length(scheduler, "a") == 3  # as if the step had never run, as an unchunked failure leaves it
    ran = len(engine.batches)
    assert scheduler.tick() == 0 and len(engine.batches) == ran  # no further chunk
    late = scheduler.enqueue(_req("a", 13, _rows(1)))  # the failed step's rows are not there
    scheduler.tick()
    assert isinstance(late.exception(timeout=0), Conflict)
    again = scheduler.enqueue(_req("a", 3, _rows(10)))  # the edge may send the step again
    _drain(scheduler)
    assert again.result(timeout=0).length == 13


def test_a_chunk_refused_at_admission_fails_the_step() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4)
    doomed = scheduler.enqueue(_req("a", 0, _rows(10)))
    scheduler.tick()
    scheduler.table.close("a" * 16)  # closed (or expired) between two chunks
    assert scheduler.tick() == 1
    assert isinstance(doomed.exception(timeout=0), NotFound)
    assert scheduler.tick() == 0 and engine.batches == [[(0, 4)]]


def test_a_client_that_left_mid_step_stops_its_chunks() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4)
    gone = scheduler.enqueue(_req("a", 0, _rows(10)))
    kept = scheduler.enqueue(_req("b", 0, _rows(2)))
    scheduler.tick()
    assert gone.cancel()  # still pending between chunks: the client can go
    assert scheduler.tick() == 0 and engine.batches == [[(0, 4), (0, 2)]]
    assert _length(scheduler, "a") == 0 and kept.result(timeout=0).length == 2
    with pytest.raises(concurrent.futures.CancelledError):
        gone.result(timeout=0)


class LeavingEngine(RecordingEngine):
    """Its client goes away while the forward runs (set `leaving`)."""

    leaving: concurrent.futures.Future | None = None

    def run(self, steps):
        if self.leaving is not None:
            assert self.leaving.cancel()
        return super().run(steps)


def test_a_chunk_that_fails_after_its_client_left_does_not_stop_the_runner() -> None:
    engine = LeavingEngine()
    scheduler = _scheduler(engine, chunk=4)
    gone = scheduler.enqueue(_req("a", 0, _rows(10)))
    scheduler.tick()
    engine.leaving, engine.fail_next = gone, True
    assert scheduler.tick() == 1  # the failure finds the future cancelled: nothing to tell, nothing raised
    assert gone.cancelled() and _length(scheduler, "a") == 0
    assert scheduler.tick() == 0


def test_stopping_fails_a_step_part_way_and_rewinds_its_session() -> None:
    engine = RecordingEngine()
    scheduler = _scheduler(engine, chunk=4)
    doomed = scheduler.enqueue(_req("a", 0, _rows(10)))
    scheduler.tick()
    scheduler.stop()
    exc = doomed.exception(timeout=0)
    assert isinstance(exc, VeilError) and exc.code == "draining"
    assert _length(scheduler, "a") == 0


# -- the setting -----------------------------------------------------------------------------------------------


def test_the_setting_comes_from_the_environment() -> None:
    assert load_settings(environ={}).core.prefill_chunk_tokens == 512
    assert load_settings(environ={"VEIL_CORE_PREFILL_CHUNK_TOKENS": "0"}).core.prefill_chunk_tokens == 0
    assert load_settings(environ={"VEIL_CORE_PREFILL_CHUNK_TOKENS": "96"}).core.prefill_chunk_tokens == 96
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        load_settings(environ={"VEIL_CORE_PREFILL_CHUNK_TOKENS": "-1"})


@pytest.mark.parametrize("engine_name, expected", [("native", 96), ("vllm", 0)])  # vLLM chunks its own prefill
def test_the_core_hands_the_setting_to_its_scheduler(monkeypatch, tmp_path, engine_name: str, expected: int) -> None:
    engine = RecordingEngine()
    engine.name = engine_name
    engine.spec = types.SimpleNamespace(hidden_size=DIM, num_layers=1, bundle_id="b" * 32)  # type: ignore[assignment]
    engine.dtype = torch.float32  # type: ignore[attr-defined]
    monkeypatch.setattr(core_app, "load_engine", lambda settings: (engine, 4, LIMIT))
    settings = load_settings(environ={"VEIL_HOME": str(tmp_path), "VEIL_CORE_PREFILL_CHUNK_TOKENS": "96"})
    load_or_create(settings.core_identity_path())
    with TestClient(core_app.create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while client.app.state.scheduler is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.app.state.scheduler.prefill_chunk_tokens == expected


@pytest.mark.slow
def test_greedy_parity_holds_through_a_real_core_with_tiny_chunks(tiny_bundles, key_file, tmp_path) -> None:
    """Every prompt runs in 3-row chunks on a real core; greedy output still equals transformers `generate`."""
    ckpt, edge, core = tiny_bundles["mistral"]  # its window (16) is shorter than the prompts
    pair = VeilPair(tmp_path, edge, core, key_file, "tiny-mistral", core_env={"VEIL_CORE_PREFILL_CHUNK_TOKENS": "3"})
    try:
        edge_model = EdgeModel.load(edge, KeySource(key_file=key_file))
        _check_pair(ckpt, pair, edge_model, "tiny-mistral", PROMPTS[:2], 12)
        metrics = httpx.get(pair.metrics_url).text  # every forward was small: the prompts really ran in chunks
        small = _sample(metrics, 'veil_core_batch_tokens_bucket{le="4.0"}')
        assert small == _sample(metrics, "veil_core_batch_tokens_count") > 0
    finally:
        pair.stop()
