"""The core's vllm engine: the HF export it loads, its row sessions in the locker, edge-held layers on it,
and a decode step that computes its new rows, not the context."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

from cloaking.cloak import cloak
from cloaking.secretbox import KeySource
from core_server.locker import open_snapshot, seal_snapshot
from edge_proxy.chat_template import render_prompt
from edge_proxy.edge_model import EdgeModel
from tests.conftest import engine_env, reference_greedy
from tests.sealed_client import SealedSession
from tests.test_parity import _until_eos, _veil_greedy
from veil.bundle import CORE_WEIGHTS, read_core_spec
from veil.errors import BundleError
from veil.identity import load_private_key
from veil.model.hf_export import EXPORT_MARKER, HF_CONFIG, HF_WEIGHTS, VOCAB_ROWS, export_hf
from veil.model.kv import Rows
from veil_cli.processes import VeilPair


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_hf_export_holds_nothing_the_native_core_bundle_does_not(arch: str, tiny_bundles, tmp_path: Path) -> None:
    ckpt, _, core = tiny_bundles[arch]
    out = export_hf(core, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted([HF_CONFIG, HF_WEIGHTS, EXPORT_MARKER])  # no tokenizer
    native = _tensors(core / CORE_WEIGHTS)
    exported = _tensors(out / HF_WEIGHTS)
    spec = read_core_spec(core)
    for name, tensor in exported.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(tensor, torch.ones(spec.hidden_size)), name  # every gain is folded away
        elif name == "model.embed_tokens.weight":
            assert tensor.shape == (VOCAB_ROWS, spec.hidden_size) and not tensor.any(), "the table carries nothing"
        else:
            assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in native.values()), name
    config = json.loads((out / HF_CONFIG).read_text())
    assert config["vocab_size"] == VOCAB_ROWS < ckpt.model.config.vocab_size and config["tie_word_embeddings"]
    assert all(config[k] is None for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
    assert export_hf(core, out) == out  # made once per bundle: its marker names the bundle


def test_hf_export_refuses_rope_it_cannot_describe(tiny_bundles, tmp_path: Path) -> None:
    _, _, core = tiny_bundles["llama"]
    bent = tmp_path / "core"
    bent.mkdir()
    tensors = _tensors(core / CORE_WEIGHTS)
    tensors["rope.inv_freq"] = tensors["rope.inv_freq"] * torch.linspace(1, 0.5, tensors["rope.inv_freq"].numel())
    from safetensors.torch import save_file

    save_file(tensors, str(bent / CORE_WEIGHTS))
    (bent / "core.json").write_text((core / "core.json").read_text())
    with pytest.raises(BundleError, match="default RoPE only"):
        export_hf(bent, tmp_path / "hf")


def test_row_sessions_go_through_the_locker_sealed() -> None:
    rows = Rows(8, dtype=torch.float32, device=torch.device("cpu"), limit=100)
    seg = rows.begin(0, 5)
    rows.rows[:5] = torch.randn(5, 8)
    rows.commit(seg)
    key = bytes(range(32))
    blob = seal_snapshot(rows, "sid", "bundle", key)
    assert rows.rows[:5].numpy().tobytes() not in blob
    back = open_snapshot(blob, "sid", "bundle", key, Rows(8, dtype=torch.float32, device=torch.device("cpu"),
                                                          limit=100))
    assert isinstance(back, Rows) and back.length == 5 and torch.equal(back.rows[:5], rows.rows[:5])
    wrong_shape = Rows(4, dtype=torch.float32, device=torch.device("cpu"), limit=100)
    assert open_snapshot(blob, "sid", "bundle", key, wrong_shape) is None
    assert open_snapshot(blob, "other", "bundle", key, Rows(8, dtype=torch.float32, device=torch.device("cpu"),
                                                             limit=100)) is None


def _rows_computed(metrics_url: str) -> float:
    text = httpx.get(metrics_url + "/metrics").text
    return float(re.search(r"^veil_core_rows_computed_total (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_a_decode_step_at_1k_context_computes_a_bounded_number_of_rows(smol_servers_vllm) -> None:
    """vLLM's own count of cached rows says what each step ran: the 1,024-row prefix comes from its prefix
    cache, so a decode step computes at most one KV block (32 rows on CPU), not the context."""
    pair = smol_servers_vllm
    edge_key = load_private_key(Path(pair.wiring["VEIL_EDGE_IDENTITY_KEY_FILE"]))
    s = SealedSession(pair.core.url, edge_key)
    torch.manual_seed(0)
    before = _rows_computed(pair.metrics_url)
    s.step(0, torch.randn(1024, 576) * 0.05)
    assert _rows_computed(pair.metrics_url) - before == 1024
    per_step = []
    for i in range(40):
        before = _rows_computed(pair.metrics_url)
        result = s.step(1024 + i, torch.randn(1, 576) * 0.05)
        assert result.length == 1025 + i and result.hidden.shape == (1, 576)
        per_step.append(_rows_computed(pair.metrics_url) - before)
    assert max(per_step) <= 32, per_step
    assert s.close().status_code == 204


@pytest.mark.slow
def test_vllm_engine_rows_equal_the_native_stack(smol_servers_vllm, smol_bundles) -> None:
    """Prefill and decode through vLLM give the native stack's residual direction; the rows asked for beyond
    the last (prompt logprobs) come back too."""
    from veil.model.decoder import DecoderStack

    pair = smol_servers_vllm
    stack = DecoderStack.load(smol_bundles[1], torch.device("cpu"))
    torch.manual_seed(1)
    x = torch.randn(70, 576) * 0.05
    ref = stack.step(x, [stack.new_session(128).begin(0, 70)])
    s = SealedSession(pair.core.url, load_private_key(Path(pair.wiring["VEIL_EDGE_IDENTITY_KEY_FILE"])))
    got = s.step(0, x[:60], want=[0, 30, -1]).hidden
    more = s.step(60, x[60:], want=[-1]).hidden

    def unit_rms(t: torch.Tensor) -> torch.Tensor:
        return t / t.pow(2).mean(-1, keepdim=True).sqrt()

    want = unit_rms(torch.stack([ref[0], ref[30], ref[59], ref[69]]))
    assert torch.allclose(torch.cat([got, more]), want, atol=2e-4)
    s.close()


@pytest.mark.slow
def test_edge_held_layers_on_the_vllm_engine_equal_transformers(smol, key_file: Path, tmp_path: Path) -> None:
    cloak(smol, tmp_path / "edge", tmp_path / "core", KeySource(key_file=key_file), "smol-k2", progress=False,
          edge_layers=2)
    (tmp_path / "pair").mkdir()
    pair = VeilPair(tmp_path / "pair", tmp_path / "edge", tmp_path / "core", key_file, "smol-k2",
                    core_env={"VEIL_CORE_MAX_TOKENS_PER_SESSION": "1024", **engine_env("vllm")})
    try:
        model = EdgeModel.load(tmp_path / "edge", KeySource(key_file=key_file))
        assert model.edge_layers == 2
        for prompt in ("What is the capital of France?", "List three prime numbers."):
            ids = render_prompt(smol.tokenizer, [{"role": "user", "content": prompt}])
            want = _until_eos(reference_greedy(smol, ids, 24), model.eos_ids)
            assert asyncio.run(_veil_greedy(model, pair.core_transport(), ids, 24))[0] == want
        assert "engine=vllm" in pair.core.log()
    finally:
        pair.stop()


def test_veil_cloak_core_format_hf_writes_the_export_into_the_core_bundle(tiny_checkpoints, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    from veil_cli.main import main

    monkeypatch.setenv("VEIL_HOME", str(tmp_path / "home"))
    core = tmp_path / "core"
    assert main(["cloak", str(tiny_checkpoints["qwen3"]), "--edge-out", str(tmp_path / "edge"), "--core-out",
                 str(core), "--core-format", "hf"]) == 0
    assert "core as HF" in capsys.readouterr().out
    from core_server.vllm_engine import hf_folder

    spec = read_core_spec(core)
    assert hf_folder(core, tmp_path / "home", spec) == core / "hf"  # the engine takes it as it is
    assert json.loads((core / "hf" / EXPORT_MARKER).read_text())["bundle_id"] == spec.bundle_id
    assert not (tmp_path / "home" / "core-hf").exists()
    marker = core / "hf" / EXPORT_MARKER  # a stale export in a (read-only) bundle is left alone, not rewritten
    marker.write_text(marker.read_text().replace(spec.bundle_id, "0" * 32))
    assert hf_folder(core, tmp_path / "home", spec) == tmp_path / "home" / "core-hf" / spec.bundle_id
    assert "0" * 32 in marker.read_text()
