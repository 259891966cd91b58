import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cloaking.checkpoint import load_checkpoint
from cloaking.cloak import cloak, random_orthogonal, unseal_rotation
from cloaking.secretbox import KeySource
from tests.tiny_models import ARCHITECTURES
from veil.bundle import CORE_SPEC, CORE_WEIGHTS, EDGE_SEALED_Q, EDGE_WEIGHTS, read_core_spec, read_edge_spec
from veil.errors import BundleError


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_core_bundle_holds_decoder_weights_and_config_only(arch: str, tiny_bundles) -> None:
    ckpt, edge, core = tiny_bundles[arch]
    assert sorted(p.name for p in core.iterdir()) == [CORE_SPEC, CORE_WEIGHTS]
    vocab = ckpt.model.config.vocab_size
    shapes = _tensor_shapes(core / CORE_WEIGHTS)
    assert not any(vocab in shape for shape in shapes.values()), "no vocabulary-sized tensor (embedding, LM head)"
    assert not any(k.startswith(("embed", "lm_head", "model.", "norm")) for k in shapes)
    assert all(k.startswith("layers.") or k == "rope.inv_freq" for k in shapes)
    spec = json.loads((core / CORE_SPEC).read_text())
    assert "vocab" not in json.dumps(spec) and "token" not in json.dumps(spec)
    assert read_core_spec(core).architecture == arch


def test_edge_bundle_keeps_q_sealed(tiny_bundles, key_file: Path) -> None:
    ckpt, edge, core = tiny_bundles["llama"]
    assert (edge / "tokenizer" / "tokenizer.json").is_file()
    assert set(_tensor_shapes(edge / EDGE_WEIGHTS)) == {"embed", "norm", "lm_head"}  # tiny models are untied
    spec = read_edge_spec(edge)
    q = unseal_rotation((edge / EDGE_SEALED_Q).read_bytes(), KeySource(key_file=key_file), spec.bundle_id)
    assert q.shape == (64, 64)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=q.dtype), atol=1e-12)
    assert spec.bundle_id == read_core_spec(core).bundle_id
    with pytest.raises(BundleError):
        unseal_rotation((edge / EDGE_SEALED_Q).read_bytes(), KeySource(passphrase="guess"), spec.bundle_id)


def test_every_cloak_draws_a_fresh_rotation_and_never_overwrites(tiny_checkpoints, tmp_path: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoints["llama"])
    src = KeySource(passphrase="p")
    cloak(ckpt, tmp_path / "e1", tmp_path / "c1", src, "m", progress=False)
    cloak(ckpt, tmp_path / "e2", tmp_path / "c2", src, "m", progress=False)
    q1 = unseal_rotation((tmp_path / "e1" / EDGE_SEALED_Q).read_bytes(), src, read_edge_spec(tmp_path / "e1").bundle_id)
    q2 = unseal_rotation((tmp_path / "e2" / EDGE_SEALED_Q).read_bytes(), src, read_edge_spec(tmp_path / "e2").bundle_id)
    assert not torch.allclose(q1, q2)
    with pytest.raises(BundleError, match="already exists"):
        cloak(ckpt, tmp_path / "e1", tmp_path / "c3", src, "m", progress=False)
    assert not (tmp_path / "c3").exists(), "a refused cloak leaves nothing behind"


def test_random_orthogonal_is_orthogonal_and_seedable() -> None:
    q = random_orthogonal(32, seed=1)
    assert torch.allclose(q.T @ q, torch.eye(32, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, random_orthogonal(32, seed=1))


def test_unsupported_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="neither a folder nor a .gguf"):
        load_checkpoint(tmp_path / "missing.bin")
