"""Decode steps at fixed shapes (veil.model.decode_graphs): padded batch and key buckets must give what the eager
path gives, for every attention variant; on a GPU, the captured graphs' replays must too.

Needs no fixture from conftest (random stacks of small shapes), so it also runs on a lent GPU machine with
`python -m pytest --noconftest tests/model/test_decode_graphs.py`."""

from __future__ import annotations

import gc

import pytest
import torch

from core_server.engine import EngineStep, NativeEngine
from veil.model.decode_graphs import DecodeGraphs, buckets
from veil.model.decoder import DecoderStack
from veil.model.kv import KVPool
from veil.model.synthetic import core_spec, random_stack

SHAPES = {  # grouped queries; per-head norms; a sliding window shorter than the sessions
    "gqa": dict(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96),
    "qk_norm": dict(layers=2, hidden=64, heads=4, kv_heads=1, head_dim=32, intermediate=96, qk_norm=True),
    "window": dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, window=20),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stack(shape: str, device: str) -> DecoderStack:
    return random_stack(core_spec(**SHAPES[shape]), torch.device(device), torch.float32)


def test_buckets_double_from_the_first_and_end_at_the_top() -> None:
    assert buckets(1, 6) == [1, 2, 4, 6]
    assert buckets(64, 256) == [64, 128, 256]
    assert buckets(64, 64) == [64] and buckets(8, 5) == [5]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fixed_shape_decode_equals_the_eager_path(shape: str, device: str) -> None:
    """Sessions of different lengths (across key buckets, past the window) decode in batches of 1, 3 and 5 rows
    (padded to 1, 4 and 8) through the fixed-shape path and, on twin sessions, through the eager one."""
    stack = _stack(shape, device)
    fixed_pool, eager_pool = stack.new_pool(8, 160), stack.new_pool(8, 160)
    fixed = DecodeGraphs(stack, fixed_pool, capture=device == "cuda")
    gen = torch.Generator().manual_seed(1)
    d = stack.spec.hidden_size
    lengths = [3, 40, 70, 7, 120]  # key buckets 64, 128 and 160
    pairs = [(fixed_pool.session(), eager_pool.session()) for _ in lengths]
    for (f, e), n in zip(pairs, lengths):
        x = torch.randn(n, d, generator=gen)
        stack.step(x, [f.begin(0, n)])
        stack.step(x, [e.begin(0, n)])
    for i, rows in enumerate((1, 3, 5, 5)):
        chosen = pairs[:rows] if i < 3 else pairs[::-1]  # slots out of order too
        x = torch.randn(rows, d, generator=gen)
        segments = [f.begin(f.length, 1) for f, _ in chosen]
        assert fixed.takes(segments)
        out = fixed.step(x, segments)
        want = stack.step(x, [e.begin(e.length, 1) for _, e in chosen])
        assert torch.allclose(out.cpu(), want.cpu(), atol=1e-4, rtol=1e-4), (shape, rows,
                                                                             float((out.cpu() - want.cpu()).abs().max()))
    assert all(f.length == e.length for f, e in pairs)


def test_prefill_or_another_pools_sessions_are_not_taken() -> None:
    stack = _stack("gqa", "cpu")
    pool, other = stack.new_pool(4, 64), stack.new_pool(4, 64)
    fixed = DecodeGraphs(stack, pool, capture=False)
    a, b, c = pool.session(), pool.session(), other.session()
    assert fixed.takes([a.begin(0, 1), b.begin(0, 1)])
    assert not fixed.takes([a.begin(0, 2)])  # a prefill
    assert not fixed.takes([a.begin(0, 1), c.begin(0, 1)])
    assert not fixed.takes([stack.new_session(64).begin(0, 1)])  # not pooled


def test_a_reused_slot_is_cleared_past_its_new_session() -> None:
    """A slot's old contents past a new session's end (here NaN, as a fresh pool's memory may be) must not reach
    the new session's masked attention."""
    stack = _stack("gqa", "cpu")
    pool = stack.new_pool(2, 64)
    fixed = DecodeGraphs(stack, pool, capture=False)
    first = pool.session()
    slot = first.slot
    del first
    gc.collect()
    pool.k[:, slot].fill_(float("nan"))
    pool.v[:, slot].fill_(float("nan"))
    again = pool.session()
    assert again.slot == slot
    x = torch.randn(4, stack.spec.hidden_size)
    stack.step(x[:3], [again.begin(0, 3)])
    out = fixed.step(x[3:], [again.begin(3, 1)])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_the_native_engine_sends_decode_batches_through_the_graphs(device: str) -> None:
    """With cuda_graphs the engine runs decode-only batches at fixed shapes and everything else eagerly; on a
    CPU the same engine is built with capture off to check the dispatch."""
    stack = _stack("gqa", device)
    engine = NativeEngine(stack, 4, 96, cuda_graphs=device == "cuda")
    if engine.graphs is None:
        engine.graphs = DecodeGraphs(stack, engine.pool, capture=False)
    twin: KVPool = stack.new_pool(4, 96)
    gen = torch.Generator().manual_seed(2)
    d = stack.spec.hidden_size
    a, b = engine.new_session(96), engine.new_session(96)
    ta, tb = twin.session(), twin.session()
    prompt = torch.randn(10, d, generator=gen)
    outs = engine.run([EngineStep(prompt, a.begin(0, 10), [-1]), EngineStep(prompt[:4], b.begin(0, 4), [-1])])
    stack.step(torch.cat([prompt, prompt[:4]]), [ta.begin(0, 10), tb.begin(0, 4)])
    assert engine.graphs.batches == 0  # the prefill ran eagerly
    x = torch.randn(2, d, generator=gen)
    outs = engine.run([EngineStep(x[:1], a.begin(10, 1), [0]), EngineStep(x[1:], b.begin(4, 1), [0])])
    want = stack.step(x, [ta.begin(10, 1), tb.begin(4, 1)])
    assert engine.graphs.batches == 1  # the decode batch took the fixed-shape path
    assert torch.allclose(torch.cat(outs), want.cpu(), atol=1e-4, rtol=1e-4)
    assert (a.length, b.length) == (11, 5)


def test_a_bucket_whose_capture_fails_runs_eagerly_and_is_not_retried(monkeypatch, caplog) -> None:
    """A failed capture (out of memory, say) must not fail the step or every later one: that bucket runs the same
    step eagerly from then on, and the failure is logged once."""
    stack = _stack("gqa", "cpu")
    pool, twin = stack.new_pool(4, 64), stack.new_pool(4, 64)
    fixed = DecodeGraphs(stack, pool, capture=False)
    fixed.capture = True  # as on a GPU, with a capture that fails
    tries = []

    def fail(b: int, t: int):
        tries.append((b, t))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fixed, "_capture", fail)
    a, ta = pool.session(), twin.session()
    x = torch.randn(7, stack.spec.hidden_size)
    stack.step(x[:5], [a.begin(0, 5)])
    stack.step(x[:5], [ta.begin(0, 5)])
    with caplog.at_level("ERROR", logger="veil.model.graphs"):
        for i in (5, 6):
            out = fixed.step(x[i : i + 1], [a.begin(i, 1)])
            want = stack.step(x[i : i + 1], [ta.begin(i, 1)])
            assert torch.allclose(out, want, atol=1e-4, rtol=1e-4)
    assert tries == [(1, 64)]
    assert [r.getMessage() for r in caplog.records] == [
        "decode graph capture failed rows=1 keys=64 error=OutOfMemoryError; this bucket runs eagerly"]
