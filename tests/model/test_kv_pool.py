"""The KV pool: sessions in slots of one tensor made at start, and decode rows attended in one call per layer.
Batched results must equal each session run on its own, for mixed prefill and decode batches."""

from __future__ import annotations

import gc

import pytest
import torch

from veil.errors import RateLimited
from veil.model.decoder import DecoderStack, PooledDecode
from veil.model.kv import KVPool, PooledSession


def _pool(stack: DecoderStack, slots: int, limit: int = 64) -> KVPool:
    return stack.new_pool(slots, limit)


@pytest.mark.parametrize("quantize", ["none", "int8"])  # int8 layers quantize each row apart from its batch
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])  # GQA, per-head norms and wide heads, a window
def test_mixed_batches_on_the_pool_equal_each_session_alone(arch: str, quantize: str, tiny_bundles) -> None:
    _, _, core = tiny_bundles[arch]
    stack = DecoderStack.load(core, torch.device("cpu"), quantize=quantize)
    pool = _pool(stack, 6)
    gen = torch.Generator().manual_seed(0)
    d = stack.spec.hidden_size
    lengths = [5, 23, 1, 30]  # the window of the Mistral model is 16: some sessions are past it
    pooled = [pool.session() for _ in lengths]
    alone = [stack.new_session(64) for _ in lengths]
    for p, a, n in zip(pooled, alone, lengths):
        x = torch.randn(n, d, generator=gen)
        stack.step(x, [p.begin(0, n)])
        stack.step(x, [a.begin(0, n)])
    for round_ in range(4):
        # decode rows of every session but one, which takes a 3-row step, plus a fresh session's prefill
        fresh_p, fresh_a = pool.session(), stack.new_session(64)
        sizes = [3 if i == round_ else 1 for i in range(len(lengths))] + [4]
        xs = [torch.randn(n, d, generator=gen) for n in sizes]
        sessions_p, sessions_a = pooled + [fresh_p], alone + [fresh_a]
        segments = [s.begin(s.length, n) for s, n in zip(sessions_p, sizes)]
        assert PooledDecode.of(segments, [0] * len(segments), stack) is not None  # the batched path runs
        out = stack.step(torch.cat(xs), segments)
        want = torch.cat([stack.step(x, [s.begin(s.length, x.shape[0])]) for s, x in zip(sessions_a, xs)])
        err = float((out - want).abs().max())
        if quantize == "none":
            assert torch.allclose(out, want, atol=1e-4, rtol=1e-4), (arch, quantize, round_, err)
        else:
            # An int8 layer quantizes each row by the same rule in any batch (exactly: test_int8.py), but the
            # batched decode attention and a lone session's are different kernels, a float rounding apart, and
            # that can flip one activation's int8 rounding, moving its row by about one quantization step: seen
            # for about 2% of cloaking keys (up to 0.36 on outputs of magnitude 30; every other key within 2e-5)
            assert err <= 0.02 * float(want.abs().max()), (arch, quantize, round_, err)
        del fresh_p, segments
        gc.collect()
    assert all(p.length == a.length for p, a in zip(pooled, alone))


def test_slots_are_lowest_first_reused_and_the_pool_refuses_when_full(tiny_bundles) -> None:
    _, _, core = tiny_bundles["llama"]
    stack = DecoderStack.load(core, torch.device("cpu"))
    pool = _pool(stack, 3, limit=8)
    a, b, c = pool.session(), pool.session(), pool.session()
    assert [a.slot, b.slot, c.slot] == [0, 1, 2] and pool.in_use() == 3
    assert isinstance(a, PooledSession) and a.capacity == 8 and a.k.data_ptr() == pool.k[:, 0].data_ptr()
    with pytest.raises(RateLimited, match="no free slot") as exc:
        pool.session(wait=0)
    assert exc.value.code == "kv_pool_full"
    del b
    gc.collect()
    again = pool.session(wait=0)
    assert again.slot == 1 and pool.in_use() == 3
    with pytest.raises(Exception, match="limit is 8"):
        again.begin(0, 9)  # a slot never grows past the core's token limit
