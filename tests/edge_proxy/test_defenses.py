"""Defenses at the edge: embedding noise and edge-held layers (`veil cloak --edge-layers k`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cloaking.checkpoint import load_checkpoint
from cloaking.cloak import cloak, fold_layer, unseal_rotation
from cloaking.secretbox import KeySource
from edge_proxy.chat_template import render_prompt
from edge_proxy.edge_model import EdgeModel
from edge_proxy.generate import Engine
from edge_proxy.generation import Generation, Status
from edge_proxy.metrics import EdgeMetrics
from edge_proxy.outgoing import NoiseSpec, OutgoingStates
from edge_proxy.sampling import SamplingParams
from tests.conftest import reference_greedy
from tests.inprocess_core import InProcessCore
from veil.bundle import CORE_WEIGHTS, EDGE_LAYERS_WEIGHTS, EDGE_SEALED_Q, read_core_spec, read_edge_spec
from veil.model.int8 import Int8Linear

PROMPTS = ["What is the capital of France?", "List three prime numbers.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def layered(tiny_checkpoints, key_file: Path, tmp_path_factory) -> dict:
    """Tiny Llama and Qwen3 cloaked with the first block at the edge."""
    out = {}
    for arch in ("llama", "qwen3"):
        root = tmp_path_factory.mktemp(f"layered-{arch}")
        ckpt = load_checkpoint(tiny_checkpoints[arch])
        cloak(ckpt, root / "edge", root / "core", KeySource(key_file=key_file), f"tiny-{arch}", progress=False,
              edge_layers=1)
        out[arch] = (ckpt, root / "edge", root / "core")
    return out


def _greedy(model: EdgeModel, core: InProcessCore, prompt_ids: list[int], n: int, noise: NoiseSpec = NoiseSpec(),
            seed: int | None = None) -> list[int]:
    engine = Engine(model, core, EdgeMetrics())
    gen = Generation("t", prompt_ids, n, SamplingParams(temperature=0.0), noise=noise)

    async def run() -> None:
        await engine.connect()
        async for _ in engine.run(gen):
            pass

    if seed is not None:
        torch.manual_seed(seed)
    asyncio.run(run())
    assert gen.status is Status.FINISHED
    return gen.output_ids


def _until_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in eos), ids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_core_bundle_with_edge_layers_holds_none_of_the_first_blocks(arch: str, layered, key_file: Path) -> None:
    ckpt, edge, core = layered[arch]
    spec = read_core_spec(core)
    assert spec.first_layer == 1 and spec.num_layers == ckpt.model.config.num_hidden_layers - 1
    assert sorted(p.name for p in core.iterdir()) == ["core.json", "core.safetensors"]
    q = unseal_rotation((edge / EDGE_SEALED_Q).read_bytes(), KeySource(key_file=key_file), read_edge_spec(edge).bundle_id)
    sd = ckpt.model.state_dict()
    first = fold_layer(sd, 0, q)
    second = fold_layer(sd, 1, q, as_index=0)
    with safe_open(str(core / CORE_WEIGHTS), framework="pt") as f:
        core_tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert torch.equal(core_tensors["layers.0.q.weight"], second["layers.0.q.weight"])  # the core starts at block 1
    for name, tensor in first.items():  # block 0 is nowhere in the core bundle
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in core_tensors.values()), name
    vocab = ckpt.model.config.vocab_size
    assert not any(vocab in t.shape for t in core_tensors.values())
    with safe_open(str(edge / EDGE_LAYERS_WEIGHTS), framework="pt") as f:
        assert set(f.keys()) == set(first) | {"rope.inv_freq"}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_edge_layers_without_noise_keep_greedy_output_identical(arch: str, layered, key_file: Path) -> None:
    ckpt, edge, core = layered[arch]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    assert model.edge_layers == 1
    for prompt in PROMPTS:
        ids = render_prompt(ckpt.tokenizer, [{"role": "user", "content": prompt}])
        want = _until_eos(reference_greedy(ckpt, ids, 16), model.eos_ids)
        assert _greedy(model, InProcessCore(core), ids, 16) == want


def test_edge_quantize_int8_runs_the_edge_layers_as_int8_too(layered, key_file: Path) -> None:
    ckpt, edge, core = layered["llama"]
    reference = EdgeModel.load(edge, KeySource(key_file=key_file))
    model = EdgeModel.load(edge, KeySource(key_file=key_file), quantize="int8")
    assert model.edge_stack is not None and model.edge_stack.quantize == "int8"
    assert isinstance(model.edge_stack.layers[0].qkv, Int8Linear) and isinstance(model.head, Int8Linear)
    ids = render_prompt(ckpt.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    x = reference.embed(ids)
    want, got = (m.edge_stack.step(x, [m.edge_stack.new_session(len(ids)).begin(0, len(ids))])  # type: ignore[union-attr]
                 for m in (reference, model))
    assert float((got - want).norm() / want.norm()) < 0.1  # near the float32 block, not equal to it
    out = _greedy(model, InProcessCore(core), ids, 8)  # and a whole generation runs through it
    assert 0 < len(out) <= 8 and all(0 <= t < model.vocab_size for t in out)


@pytest.mark.slow
def test_smollm2_with_two_edge_layers_equals_transformers(smol, key_file: Path, tmp_path: Path) -> None:
    cloak(smol, tmp_path / "edge", tmp_path / "core", KeySource(key_file=key_file), "smol-k2", progress=False,
          edge_layers=2)
    model = EdgeModel.load(tmp_path / "edge", KeySource(key_file=key_file))
    for prompt in PROMPTS:
        ids = render_prompt(smol.tokenizer, [{"role": "user", "content": prompt}])
        want = _until_eos(reference_greedy(smol, ids, 24), model.eos_ids)
        assert _greedy(model, InProcessCore(tmp_path / "core"), ids, 24) == want


def test_noise_has_the_configured_scale_is_fresh_and_seedable(tiny_bundles, key_file: Path) -> None:
    _, edge, _ = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    ids = list(range(100, 400))
    clean = model.embed(ids)
    noise = NoiseSpec(rho=0.5)
    a = OutgoingStates(model, noise, torch.Generator().manual_seed(3))(ids, 0)
    b = OutgoingStates(model, noise, torch.Generator().manual_seed(3))(ids, 0)
    c = OutgoingStates(model, noise)(ids, 0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    sigma = 0.5 * model.embedding_rms
    assert abs(float((a - clean).std()) / sigma - 1) < 0.05
    clipped = OutgoingStates(model, NoiseSpec(rho=0.0, clip=0.1))(ids, 0)
    assert float(clipped.norm(dim=-1).max()) <= 0.1 + 1e-5
    assert torch.equal(OutgoingStates(model, NoiseSpec())(ids, 0), clean)


def test_more_noise_moves_greedy_output_away(tiny_bundles, key_file: Path) -> None:
    ckpt, edge, core = tiny_bundles["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    ids = render_prompt(ckpt.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    clean = _greedy(model, InProcessCore(core), ids, 12)
    assert _greedy(model, InProcessCore(core), ids, 12, NoiseSpec(rho=0.0)) == clean
    noisy = _greedy(model, InProcessCore(core), ids, 12, NoiseSpec(rho=5.0))
    assert noisy != clean
    core_seen = InProcessCore(core)
    _greedy(model, core_seen, ids, 2, NoiseSpec(rho=1.0))
    assert not torch.allclose(core_seen.received[0], model.embed(ids), atol=1e-3), "the core sees noised states"


class ForgetfulCore(InProcessCore):
    """Drops every session after its fourth step, as an idle expiry or a core restart would."""

    async def step(self, req):
        if len(self.received) == 4:
            self.table.close(req.session)
        return await super().step(req)


def test_a_core_that_loses_the_session_costs_a_re_prefill_not_the_answer(layered, key_file: Path) -> None:
    ckpt, edge, core = layered["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    ids = render_prompt(ckpt.tokenizer, [{"role": "user", "content": PROMPTS[1]}])
    clean = _greedy(model, InProcessCore(core), ids, 12)

    forgetful = ForgetfulCore(core)
    assert _greedy(model, forgetful, ids, 12) == clean
    assert forgetful.received[5].shape[0] > 1, "the lost session was rebuilt from the edge's history"


@pytest.mark.parametrize("k", [0, 1])
def test_a_re_prefill_resends_the_rows_it_sent_not_a_fresh_noise_draw(k: int, tiny_bundles, layered,
                                                                       key_file: Path) -> None:
    ckpt, edge, core = (tiny_bundles if k == 0 else layered)["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    ids = render_prompt(ckpt.tokenizer, [{"role": "user", "content": PROMPTS[2]}])

    forgetful = ForgetfulCore(core)
    _greedy(model, forgetful, ids, 8, NoiseSpec(rho=1.0))
    sent_before = torch.cat(forgetful.received[:5])  # the prompt, then four decode rows (the last one refused)
    resent = forgetful.received[5]
    assert resent.shape == sent_before.shape
    assert torch.equal(resent, sent_before), "the re-prefill must carry the same noisy rows, bit for bit"


def test_outgoing_rows_are_kept_per_position_and_recomputed_from_a_changed_token(layered, key_file: Path) -> None:
    _, edge, _ = layered["llama"]
    model = EdgeModel.load(edge, KeySource(key_file=key_file))
    ids = list(range(100, 108))
    out = OutgoingStates(model, NoiseSpec(rho=1.0), torch.Generator().manual_seed(3))
    first = out(ids[:6], 0)
    assert torch.equal(out(ids[:6], 0), first), "the same positions and tokens come back as sent"
    other = out([999], 6)
    changed = out([998], 6)  # speculation rejected: another token at position 6
    assert not torch.equal(changed, other)
    again = out(ids[:6] + [998, 5], 0)
    assert torch.equal(again[:6], first) and torch.equal(again[6], changed[0])
    # without noise, a recomputed position equals what a fresh stream computes for the same tokens
    plain = OutgoingStates(model, NoiseSpec())
    plain(ids, 0)
    redo = plain(ids[:4] + [7, 8], 0)
    assert torch.allclose(redo, OutgoingStates(model, NoiseSpec())(ids[:4] + [7, 8], 0), atol=1e-5)
