"""A decoder block's two halves around attention, and a lone decode row's whole step, for int8 projections, as
TorchScript functions.

A decode step of a small model on a CPU is bound by the count of torch calls as much as by its weights: one
block half is eight to ten calls, and each costs about 2.5 µs from Python. TorchScript's interpreter runs the
same ops, in the same order, in about half the time, so these are `DecoderStack.attention_inputs`,
`DecoderStack.block_output` and, for one session's one new position, the whole layer loop with
`DecoderStack._attend_one_row`, for a stack whose projections are `Int8Linear` (`core.quantize: int8`, a
float32 CPU stack), bit for bit the same (tests/model/test_int8.py). The float stacks keep the eager methods:
their `Linear` picks a kernel per call in Python, and on a GPU the CUDA graphs remove the calls' cost instead.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from veil.model.int8 import Int8Args, int8_linear

# One block's int8 projections and per-head norms: (qkv, o, gate_up, down, q_norm, k_norm)
BlockArgs = Tuple[Int8Args, Int8Args, Int8Args, Int8Args, Optional[torch.Tensor], Optional[torch.Tensor]]


@torch.jit.script
def _rope_into(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # DecoderStack._rope_into on a CPU: the halves swapped, times the signed sin
    turned = src.roll(src.shape[-1] // 2, -1)
    torch.add(src * cos, turned * sin, out=dst)


@torch.jit.script
def attention_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qkv: Int8Args,
                     q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], heads: List[int],
                     eps: float) -> torch.Tensor:
    """x [N, d] -> the qkv output [N, (H + 2 KV) * hd] with the query and key heads normed (when the block has
    q_norm and k_norm) and rotated in place. `heads` is [H, KV, hd]."""
    num_heads, num_kv_heads, hd = heads[0], heads[1], heads[2]
    out = int8_linear(F.rms_norm(x, [x.shape[-1]], None, eps), qkv)
    q_rows, kv_rows = num_heads * hd, num_kv_heads * hd
    if q_norm is None or k_norm is None:  # query and key heads rotated in one call
        qk = out[:, : q_rows + kv_rows].view(-1, num_heads + num_kv_heads, hd)
        _rope_into(qk, qk, cos, sin)
        return out
    q = out[:, :q_rows].view(-1, num_heads, hd)
    k = out[:, q_rows : q_rows + kv_rows].view(-1, num_kv_heads, hd)
    _rope_into(F.rms_norm(q, [hd], q_norm, eps), q, cos, sin)
    _rope_into(F.rms_norm(k, [hd], k_norm, eps), k, cos, sin)
    return out


@torch.jit.script
def block_output(x: torch.Tensor, attn: torch.Tensor, o: Int8Args, gate_up: Int8Args, down: Int8Args,
                 eps: float) -> torch.Tensor:
    """The residual stream x [N, d] plus attention's output [N, H * hd] through o, then the MLP -> [N, d]
    (a new tensor: the x passed in may be the caller's)."""
    x = x + int8_linear(attn, o)
    gate, up = int8_linear(F.rms_norm(x, [x.shape[-1]], None, eps), gate_up).chunk(2, dim=-1)
    return x.add_(int8_linear(F.silu(gate) * up, down))


@torch.jit.script
def one_row(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocks: List[BlockArgs], keys: torch.Tensor,
            values: torch.Tensor, offset: int, heads: List[int], eps: float) -> torch.Tensor:
    """One session's decode row x [1, d] at `offset` through every block, its keys and values written into the
    session's cache (keys, values [layers, KV, T, hd]); attention sees every cached key (no window is shorter)."""
    num_heads, num_kv_heads, hd = heads[0], heads[1], heads[2]
    q_rows = num_heads * hd
    for li, (qkv, o, gate_up, down, q_norm, k_norm) in enumerate(blocks):
        row = attention_inputs(x, cos, sin, qkv, q_norm, k_norm, heads, eps)[0]
        new = row[q_rows:].view(2, num_kv_heads, hd)  # this position's keys, then its values
        keys[li, :, offset], values[li, :, offset] = new[0], new[1]
        q = row[:q_rows].view(1, num_kv_heads, num_heads // num_kv_heads, hd)
        seen = offset + 1
        attn = F.scaled_dot_product_attention(q, keys[li : li + 1, :, :seen], values[li : li + 1, :, :seen])
        x = block_output(x, attn.view(1, q_rows), o, gate_up, down, eps)
    return x
