"""Decoder stacks of a given shape with random weights, for benchmarks and tests that need no checkpoint.

The GPU benchmark's batch-1 goal is stated for an 8B-shape model (Llama 3 8B: 32 layers of hidden 4096, 32 query
and 8 key/value heads of 128, MLP 14336), whose speed depends on its shape and not on what its weights say; the
tests use small shapes of each attention variant (grouped queries, per-head norms, a sliding window). Weights are
drawn on the target device in the target dtype, so an 8B stack is made in seconds on a GPU.
"""

from __future__ import annotations

import torch

from veil.bundle import CoreSpec
from veil.model.decoder import DecoderStack
from veil.model.linear import Linear

ROPE_THETA = 500_000.0  # Llama 3's


def core_spec(*, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
              max_positions: int = 8192, qk_norm: bool = False, window: int | None = None) -> CoreSpec:
    """A core spec of this shape (every layer windowed when `window` is set)."""
    return CoreSpec(architecture="synthetic", num_layers=layers, hidden_size=hidden, num_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate, rms_norm_eps=1e-5,
                    attention_bias=False, o_bias=False, mlp_bias=False, qk_norm=qk_norm,
                    sliding_windows=[window] * layers, rope_attention_scaling=1.0, max_positions=max_positions,
                    bundle_id="synthetic")


def llama_8b_spec(layers: int = 32) -> CoreSpec:
    return core_spec(layers=layers, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336)


def random_stack(spec: CoreSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> DecoderStack:
    """A stack of `spec`'s shape; weights ~ N(0, 1/in_features) keep the residual stream's scale steady."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn((rows, cols), generator=gen, device=device, dtype=torch.float32 if device.type == "cpu"
                        else dtype)
        return w.mul_(cols ** -0.5).to(dtype)

    d, hd = spec.hidden_size, spec.head_dim
    tensors: dict[str, torch.Tensor] = {}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        tensors[p + "q.weight"] = weight(spec.num_heads * hd, d)
        tensors[p + "k.weight"] = weight(spec.num_kv_heads * hd, d)
        tensors[p + "v.weight"] = weight(spec.num_kv_heads * hd, d)
        tensors[p + "o.weight"] = weight(d, spec.num_heads * hd)
        tensors[p + "gate.weight"] = weight(spec.intermediate_size, d)
        tensors[p + "up.weight"] = weight(spec.intermediate_size, d)
        tensors[p + "down.weight"] = weight(d, spec.intermediate_size)
        if spec.qk_norm:
            tensors[p + "q_norm.weight"] = 1 + 0.1 * weight(1, hd)[0]
            tensors[p + "k_norm.weight"] = 1 + 0.1 * weight(1, hd)[0]
    tensors["rope.inv_freq"] = 1.0 / ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    return DecoderStack(spec, tensors, device, dtype)


def weight_bytes(stack: DecoderStack) -> int:
    """Bytes of weights one forward reads: every projection of every layer (norm gains are folded in); for a
    stack of plain (not int8) layers."""
    total = 0
    for layer in stack.layers:
        for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
            assert isinstance(proj, Linear), "an int8 stack's bytes are its packed weights'"
            total += proj.weight.nbytes
    return total
