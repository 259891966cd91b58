"""core.quantize int8: FBGEMM int8 layers whose rows do not depend on what they are batched with.

A shared core batches the rows of many sessions into one forward; an int8 layer that quantized the batch as a
whole would make one session's output depend on another's. These tests hold the layer and the whole stack to
bit-equality between a row run alone and the same row run in a batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cloaking.secretbox import KeySource
from edge_proxy.edge_model import EdgeModel
from tests.tiny_models import ARCHITECTURES
from veil.errors import ConfigError
from veil.model import int8_block
from veil.model.decoder import DecoderStack
from veil.model.int8 import Int8Linear, quantize_per_channel
from veil.settings import load_settings


def test_an_int8_layer_computes_the_float_product_within_quantization_error() -> None:
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    want = F.linear(x, w, b)
    got = Int8Linear(w, b)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.02


def test_each_row_gets_the_same_result_alone_as_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = Int8Linear(torch.randn(128, 64, generator=gen) * 0.05)
    # magnitudes six orders apart: a batch-wide activation scale would flatten the small rows to zero
    x = torch.randn(6, 64, generator=gen) * torch.tensor([1e-3, 1.0, 1e3, 0.5, 40.0, 0.0])[:, None]
    batched = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(batched, alone)
    assert torch.equal(layer(x[[4, 0]]), batched[[4, 0]])
    assert float(batched[0].norm()) > 0 and float(batched[5].abs().max()) == 0.0


def test_the_searched_weight_scales_never_round_worse_than_the_plain_maximum() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=gen) * 0.02
    w[:16, 7] *= 40  # outliers in half the rows, as rotated blocks still have a few
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    plain = w.abs().amax(dim=1, keepdim=True) / 127
    plain_err = (((w / plain).round() * plain - w) ** 2).sum(dim=1)
    searched_err = ((q.float() * scale[:, None] - w) ** 2).sum(dim=1)
    assert bool((searched_err <= plain_err * (1 + 1e-6)).all())
    dequantized = q.float() * scale[:, None]
    assert float((dequantized[16:] - w[16:]).norm() / w[16:].norm()) < 0.01


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])  # biases, per-head norms, a sliding window
def test_an_int8_stack_stays_near_the_float32_one(arch: str, tiny_bundles) -> None:
    # batching: tests/model/test_kv_pool.py runs its mixed batches on int8 stacks too
    _, _, core = tiny_bundles[arch]
    stack = DecoderStack.load(core, torch.device("cpu"), quantize="int8")
    reference = DecoderStack.load(core, torch.device("cpu"))
    assert isinstance(stack.layers[0].qkv, Int8Linear) and stack.quantize == "int8"
    x = torch.randn(7, stack.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    full = reference.step(x, [reference.new_session(8).begin(0, 7)])
    quant = stack.step(x, [stack.new_session(8).begin(0, 7)])
    assert float((quant - full).norm() / full.norm()) < 0.1  # near the float32 stack, not equal to it


def test_an_int8_edge_head_stays_near_the_float32_one(tiny_bundles, key_file) -> None:
    _, edge, _ = tiny_bundles["llama"]
    reference = EdgeModel.load(edge, KeySource(key_file=key_file))
    model = EdgeModel.load(edge, KeySource(key_file=key_file), quantize="int8")
    assert isinstance(model.head, Int8Linear) and model.quantize == "int8"
    hidden = torch.randn(5, reference.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    want, got = reference.logits_rows(hidden), model.logits_rows(hidden)
    assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 0.05
    assert torch.equal(model.logits_rows(hidden[2:3]), got[2:3])  # a stream's logits do not depend on its tick
    with pytest.raises(ConfigError, match="edge.quantize must be one of none, int8"):
        EdgeModel.load(edge, KeySource(key_file=key_file), quantize="int4")


def test_int8_is_refused_where_it_cannot_run() -> None:
    assert load_settings(environ={}).edge.quantize == "none"
    assert load_settings(environ={"VEIL_EDGE_QUANTIZE": "int8"}).edge.quantize == "int8"
    with pytest.raises(ConfigError, match="edge.quantize must be none or int8"):
        load_settings(environ={"VEIL_EDGE_QUANTIZE": "fp8"})
    assert load_settings(environ={}).core.quantize == "none"
    assert load_settings(environ={"VEIL_CORE_QUANTIZE": "int8"}).core.quantize == "int8"
    with pytest.raises(ConfigError, match="core.quantize must be none or int8"):
        load_settings(environ={"VEIL_CORE_QUANTIZE": "int4"})
    for extra in ({"VEIL_CORE_DTYPE": "bfloat16"}, {"VEIL_CORE_DEVICE": "cuda"}, {"VEIL_CORE_ENGINE": "vllm"}):
        with pytest.raises(ConfigError, match="native engine on a CPU with core.dtype float32"):
            load_settings(environ={"VEIL_CORE_QUANTIZE": "int8", **extra})


def test_an_int8_stack_refuses_a_bfloat16_or_gpu_layout(tiny_bundles) -> None:
    _, _, core = tiny_bundles["llama"]
    with pytest.raises(ConfigError, match="runs on a CPU with core.dtype float32"):
        DecoderStack.load(core, torch.device("cpu"), torch.bfloat16, quantize="int8")
    with pytest.raises(ConfigError, match="quantize must be one of none, int8"):
        DecoderStack.load(core, torch.device("cpu"), quantize="fp8")


@pytest.mark.parametrize("pooled", [True, False], ids=["pool", "own-cache"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_scripted_int8_blocks_equal_the_eager_ones_bit_for_bit(arch: str, pooled: bool, tiny_bundles,
                                                                    monkeypatch) -> None:
    """An int8 stack runs its blocks' halves, and a lone decode row's whole step, as TorchScript functions
    (veil/model/int8_block.py); they must compute exactly what the eager methods do, in every architecture's
    variant (biases, per-head norms, a sliding window), for prefills, lone decode rows and mixed batches."""
    _, _, core = tiny_bundles[arch]
    scripted = DecoderStack.load(core, torch.device("cpu"), quantize="int8")
    eager = DecoderStack.load(core, torch.device("cpu"), quantize="int8")
    eager.script_int8 = False
    assert scripted.script_int8
    calls = []
    for name in ("attention_inputs", "block_output", "one_row"):
        compiled = getattr(int8_block, name)
        monkeypatch.setattr(int8_block, name, lambda *args, _f=compiled, _n=name: calls.append(_n) or _f(*args))
    x = torch.randn(40, scripted.spec.hidden_size, generator=torch.Generator().manual_seed(4))
    if pooled:
        sessions = [[pool.session() for _ in range(3)] for pool in (st.new_pool(3, 64) for st in (scripted, eager))]
    else:
        sessions = [[st.new_session(64) for _ in range(3)] for st in (scripted, eager)]

    def both(rows: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        a, b = ([st.step(rows, [sess[i].begin(offset, n) for i, offset, n in spans])
                 for st, sess in zip((scripted, eager), sessions)])
        assert torch.equal(a, b)

    both(x[:10], [(0, 0, 10)])  # a prefill
    for t in range(10, 20):  # lone decode rows (Mistral's window of 16 is crossed at 17)
        both(x[t : t + 1], [(0, t, 1)])
    both(x[20:28], [(1, 0, 8)])
    both(x[28:31], [(0, 20, 1), (1, 8, 1), (2, 0, 1)])  # decode rows with a fresh session's first
    both(x[31:40], [(0, 21, 1), (2, 1, 8)])  # a decode row beside a prefill
    window = scripted.spec.sliding_windows[0]
    lone = sum(1 for end in range(11, 21) if window is None or end <= window)  # steps that see every key
    layers = scripted.spec.num_layers
    assert calls.count("one_row") == lone
    assert calls.count("attention_inputs") == calls.count("block_output") == (14 - lone) * layers
