"""The core bundle as a Hugging Face folder that an existing engine (vLLM) loads unchanged.

The folded blocks are a standard Llama/Qwen2/Qwen3/Mistral stack: every norm gain is 1 and Q
lives inside the weights. What an HF model has besides the blocks carries nothing here:
- the final norm's gain is 1, so the engine's last hidden state is the direction of the
  rotated residual stream (the edge's own final RMSNorm does not care about its scale);
- the embedding table is `VOCAB_ROWS` rows of zeros, tied to the LM head: inputs arrive as
  embeddings (prompt embeds) and no logits are ever computed, so the table holds no
  vocabulary information, only the shape an HF config needs;
- rotary frequencies become `rope_theta`, checked to give back the bundle's own inv_freq.
No tokenizer is written. `export_hf` is what `veil cloak --core-format hf` writes and what
the core's vllm engine makes at start from a native core bundle.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from veil.bundle import CORE_SPEC, CORE_WEIGHTS, CoreSpec, load_tensors, read_core_spec
from veil.errors import BundleError

VOCAB_ROWS = 1  # the smallest table an HF config describes; never read
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# what the export is made from; a folder whose marker matches is reused as it is
EXPORT_MARKER = "veil_export.json"
EXPORT_VERSION = 1  # bump when the export's layout changes: older exports are then remade
BUNDLE_SUBDIR = "hf"  # `veil cloak --core-format hf` writes the export here, inside the core bundle

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
         "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}


def rope_theta(spec: CoreSpec, inv_freq: torch.Tensor) -> float:
    """The base whose default RoPE frequencies are `inv_freq`; refuse scaled RoPE, which the export cannot
    describe without the original config."""
    if spec.rope_attention_scaling != 1.0:
        raise BundleError("this bundle's RoPE has an attention scaling; the HF export supports default RoPE only")
    half = spec.head_dim // 2
    if inv_freq.shape != (half,) or half < 2:
        raise BundleError("core bundle's rope.inv_freq does not match its head_dim")
    # log inv_freq[i] = -(2i / hd) log theta: fit over every frequency, then snap to the integer bases
    # configs use (float32 frequencies hold about seven digits)
    slope = torch.arange(0, spec.head_dim, 2, dtype=torch.float64)[1:] / spec.head_dim
    theta = float(torch.exp(-(slope * inv_freq.double()[1:].log()).sum() / (slope * slope).sum()))
    if abs(theta - round(theta)) <= 1e-5 * theta:
        theta = float(round(theta))
    expected = 1.0 / (theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim))
    if not torch.allclose(inv_freq.double(), expected, rtol=1e-5, atol=0):
        raise BundleError("this bundle's RoPE frequencies are scaled (not one base); the HF export supports "
                          "default RoPE only")
    return theta


def hf_config(spec: CoreSpec, theta: float, dtype: str = "float32") -> dict:
    """An HF config describing exactly the folded blocks and nothing of the vocabulary."""
    arch = _ARCHITECTURES.get(spec.architecture)
    if arch is None:
        raise BundleError(f"architecture {spec.architecture!r} has no HF export")
    windows = {w for w in spec.sliding_windows if w is not None}
    if len(windows) > 1 or (windows and None in spec.sliding_windows):
        raise BundleError("the HF export supports one sliding window for every layer, or none")
    cfg: dict = {
        "architectures": [arch],
        "model_type": spec.architecture,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": spec.max_positions,
        "vocab_size": VOCAB_ROWS,
        "bos_token_id": None,  # no token has a meaning here (HF configs otherwise default them to 1 and 2)
        "eos_token_id": None,
        "pad_token_id": None,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if spec.architecture == "llama":
        if spec.attention_bias != spec.o_bias:
            raise BundleError("a Llama export needs q/k/v and o biases together or not at all")
        cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    elif spec.o_bias or spec.mlp_bias:
        raise BundleError(f"{spec.architecture} has no o or MLP biases; this bundle does")
    if spec.architecture == "qwen3":
        cfg["attention_bias"] = spec.attention_bias
    elif spec.architecture == "qwen2" and not spec.attention_bias:
        raise BundleError("a Qwen2 export needs q/k/v biases")
    if spec.architecture == "qwen2" and spec.head_dim * spec.num_heads != spec.hidden_size:
        raise BundleError("a Qwen2 export needs head_dim x heads = hidden_size")
    if spec.architecture in ("mistral", "qwen2", "qwen3"):
        cfg["sliding_window"] = next(iter(windows)) if windows else None
        if spec.architecture != "mistral":
            cfg["use_sliding_window"] = bool(windows)
    elif windows:
        raise BundleError("a Llama export cannot describe sliding windows")
    return cfg


def hf_tensors(spec: CoreSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The folded blocks under HF names, unit norm gains and the zero embedding table."""
    out: dict[str, torch.Tensor] = {}
    ones = torch.ones(spec.hidden_size, dtype=dtype)
    for i in range(spec.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for name, tensor in tensors.items():
            if not name.startswith(src):
                continue
            short, kind = name[len(src):].rsplit(".", 1)
            if short not in _PROJ:
                raise BundleError(f"core bundle tensor {name} has no HF name")
            out[f"{dst}{_PROJ[short]}.{kind}"] = tensor.to(dtype).contiguous()
        out[dst + "input_layernorm.weight"] = ones.clone()
        out[dst + "post_attention_layernorm.weight"] = ones.clone()
    out["model.norm.weight"] = ones.clone()
    out["model.embed_tokens.weight"] = torch.zeros(VOCAB_ROWS, spec.hidden_size, dtype=dtype)
    return out


def _marker(spec: CoreSpec, dtype: torch.dtype) -> dict:
    return {"export_version": EXPORT_VERSION, "bundle_id": spec.bundle_id, "dtype": str(dtype).removeprefix("torch."),
            "first_layer": spec.first_layer}


def is_current_export(core_dir: Path, folder: Path, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `folder` holds this version's export of the bundle in `core_dir`, in `dtype`."""
    try:
        return json.loads((Path(folder) / EXPORT_MARKER).read_text()) == _marker(read_core_spec(core_dir), dtype)
    except (OSError, ValueError):
        return False


def export_hf(core_dir: Path, target: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `target` as an HF folder of the core bundle in `core_dir` (atomically); reuse it when it was
    already made from this bundle in this dtype. -> target"""
    core_dir, target = Path(core_dir), Path(target)
    if is_current_export(core_dir, target, dtype):
        return target
    spec = read_core_spec(core_dir, CORE_SPEC)
    dtype_name = str(dtype).removeprefix("torch.")
    marker = _marker(spec, dtype)
    tensors = load_tensors(core_dir / CORE_WEIGHTS)
    inv_freq = tensors.pop("rope.inv_freq", None)
    if inv_freq is None:
        raise BundleError("core bundle lacks tensor rope.inv_freq")
    config = hf_config(spec, rope_theta(spec, inv_freq), dtype_name)
    weights = hf_tensors(spec, tensors, dtype)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

