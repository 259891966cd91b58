"""`veil cloak`: fold a fresh secret rotation Q into a checkpoint and split it into bundles.

For every layer (DESIGN.md, "Cloaking, exactly"):
  q,k,v,gate,up: W <- W · diag(g_norm) · Qᵀ    (the norm gain becomes 1)
  o,down:        W <- Q · W,  b <- Q · b
so the core maps Q·x to Q·h and the edge keeps embedding, final norm, LM head and Q.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from cloaking.checkpoint import Checkpoint
from cloaking.secretbox import KeySource, seal, unseal
from veil.bundle import (
    CORE_SPEC,
    CORE_WEIGHTS,
    EDGE_LAYERS_SPEC,
    EDGE_LAYERS_WEIGHTS,
    EDGE_SEALED_Q,
    EDGE_SPEC,
    EDGE_TOKENIZER,
    EDGE_WEIGHTS,
    CoreSpec,
    EdgeSpec,
    write_spec,
)
from veil.errors import BundleError


def random_orthogonal(dim: int, seed: int | None = None) -> torch.Tensor:
    """Haar-random orthogonal [dim, dim] in float64; from 128 bits of OS entropy unless seeded."""
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q *= np.sign(np.diag(r))  # sign fix makes the distribution uniform (Haar)
    return torch.from_numpy(q)


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def core_spec_for(model: Any, bundle_id: str, first: int = 0, end: int | None = None) -> CoreSpec:
    """Spec of the decoder blocks [first, end) of `model`."""
    cfg = model.config
    sd_keys = set(model.state_dict().keys())
    p = _layer_prefix(0)
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise BundleError(f"activation {cfg.hidden_act!r} is not supported (silu only)")
    n_layers = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types:
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    elif cfg.model_type == "mistral" and window:
        windows = [window] * n_layers
    else:
        windows = [None] * n_layers
    rotary = model.model.rotary_emb
    end = n_layers if end is None else end
    return CoreSpec(
        architecture=cfg.model_type,
        num_layers=end - first,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=float(cfg.rms_norm_eps),
        attention_bias=p + "self_attn.q_proj.bias" in sd_keys,
        o_bias=p + "self_attn.o_proj.bias" in sd_keys,
        mlp_bias=p + "mlp.down_proj.bias" in sd_keys,
        qk_norm=p + "self_attn.q_norm.weight" in sd_keys,
        sliding_windows=windows[first:end],
        rope_attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        max_positions=int(cfg.max_position_embeddings),
        bundle_id=bundle_id,
        first_layer=first,
    )


def fold_layer(sd: dict[str, torch.Tensor], i: int, q: torch.Tensor,
               as_index: int | None = None) -> dict[str, torch.Tensor]:
    """Folded float32 weights of decoder layer i, named `layers.{as_index or i}.*`; q is float64 [d, d]."""
    p, out = _layer_prefix(i), {}
    j = i if as_index is None else as_index
    g_in = sd[p + "input_layernorm.weight"].double()
    g_post = sd[p + "post_attention_layernorm.weight"].double()

    def read(name: str) -> torch.Tensor:
        return sd[p + name].double()

    for src, dst, gain in (("self_attn.q_proj", "q", g_in), ("self_attn.k_proj", "k", g_in),
                           ("self_attn.v_proj", "v", g_in), ("mlp.gate_proj", "gate", g_post),
                           ("mlp.up_proj", "up", g_post)):
        out[f"layers.{j}.{dst}.weight"] = read(src + ".weight") * gain[None, :] @ q.T
        if p + src + ".bias" in sd:
            out[f"layers.{j}.{dst}.bias"] = read(src + ".bias")
    for src, dst in (("self_attn.o_proj", "o"), ("mlp.down_proj", "down")):
        out[f"layers.{j}.{dst}.weight"] = q @ read(src + ".weight")
        if p + src + ".bias" in sd:
            out[f"layers.{j}.{dst}.bias"] = q @ read(src + ".bias")
    for norm in ("q_norm", "k_norm"):  # per-head norms sit outside the residual stream
        if p + f"self_attn.{norm}.weight" in sd:
            out[f"layers.{j}.{norm}.weight"] = read(f"self_attn.{norm}.weight")
    return {k: v.float().contiguous() for k, v in out.items()}


def eos_ids(ckpt: Checkpoint) -> list[int]:
    ids: set[int] = set()
    gen = getattr(ckpt.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for e in eos if isinstance(eos, (list, tuple)) else [eos]:
        if e is not None:
            ids.add(int(e))
    if ckpt.tokenizer.eos_token_id is not None:
        ids.add(int(ckpt.tokenizer.eos_token_id))
    return sorted(ids)


def seal_rotation(q: torch.Tensor, source: KeySource, bundle_id: str) -> bytes:
    return seal(save_bytes({"q": q.contiguous()}), source, aad=bundle_id.encode())


def unseal_rotation(blob: bytes, source: KeySource, bundle_id: str) -> torch.Tensor:
    tensors = load_bytes(unseal(blob, source, aad=bundle_id.encode()))
    return tensors["q"]


def _fresh_dir(target: Path, force: bool) -> Path:
    if target.exists() and not force:
        raise BundleError(f"{target} already exists (use --force to replace it)")
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def cloak(
    ckpt: Checkpoint,
    edge_dir: Path,
    core_dir: Path,
    key_source: KeySource,
    model_name: str,
    *,
    force: bool = False,
    progress: bool = True,
    seed: int | None = None,
    edge_layers: int = 0,
) -> str:
    """Write the edge and core bundles for `ckpt`; returns the shared bundle id.

    With `edge_layers=k` the edge bundle also holds the first k blocks (folded the same way)
    and the core bundle only blocks k..L-1, renumbered from 0.
    """
    from tqdm import tqdm

    model = ckpt.model
    sd = model.state_dict()
    bundle_id = uuid.uuid4().hex
    n_layers = model.config.num_hidden_layers
    if not 0 <= edge_layers < n_layers:
        raise BundleError(f"--edge-layers must be between 0 and {n_layers - 1} for this model")
    spec = core_spec_for(model, bundle_id, edge_layers)
    q = random_orthogonal(spec.hidden_size, seed)
    edge_dir, core_dir = Path(edge_dir), Path(core_dir)
    edge_tmp, core_tmp = _fresh_dir(edge_dir, force), _fresh_dir(core_dir, force)
    try:
        inv_freq = model.model.rotary_emb.inv_freq.detach().float().contiguous()
        core: dict[str, torch.Tensor] = {}
        edge_stack: dict[str, torch.Tensor] = {}
        bar = tqdm(range(n_layers), desc="cloak: folding layers", unit="layer", disable=not progress)
        for i in bar:
            if i < edge_layers:
                edge_stack.update(fold_layer(sd, i, q))
            else:
                core.update(fold_layer(sd, i, q, as_index=i - edge_layers))
        core["rope.inv_freq"] = inv_freq
        save_file(core, str(core_tmp / CORE_WEIGHTS), metadata={"bundle_id": bundle_id})
        write_spec(core_tmp / CORE_SPEC, spec)
        if edge_layers:
            edge_stack["rope.inv_freq"] = inv_freq
            save_file(edge_stack, str(edge_tmp / EDGE_LAYERS_WEIGHTS))
            write_spec(edge_tmp / EDGE_LAYERS_SPEC, core_spec_for(model, bundle_id, 0, edge_layers))

        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        edge = {"embed": sd["model.embed_tokens.weight"].float(), "norm": sd["model.norm.weight"].float()}
        if not tied:
            edge["lm_head"] = sd["lm_head.weight"].float()
        save_file({k: v.contiguous() for k, v in edge.items()}, str(edge_tmp / EDGE_WEIGHTS))
        (edge_tmp / EDGE_SEALED_Q).write_bytes(seal_rotation(q, key_source, bundle_id))
        ckpt.tokenizer.save_pretrained(str(edge_tmp / EDGE_TOKENIZER))
        write_spec(
            edge_tmp / EDGE_SPEC,
            EdgeSpec(
                model_name=model_name,
                architecture=spec.architecture,
                vocab_size=int(edge["embed"].shape[0]),
                hidden_size=spec.hidden_size,
                rms_norm_eps=spec.rms_norm_eps,
                tied_embeddings=tied,
                eos_token_ids=eos_ids(ckpt),
                max_positions=spec.max_positions,
                bundle_id=bundle_id,
                edge_layers=edge_layers,
            ),
        )
        _publish(core_tmp, core_dir)
        _publish(edge_tmp, edge_dir)
    finally:
        for tmp in (edge_tmp, core_tmp):
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return bundle_id
