"""Int8 linear layers for the core's folded blocks on a CPU (`core.quantize: int8`).

A decode step reads every weight once, so on a CPU its time follows the weights' bytes. Torch's own
weight-only int8 kernel (`aten._weight_int8pack_mm`) is 4.6-15x slower than float32 for one row and 17-25x
for 16 here (bench/weight_kernels.py), so this takes FBGEMM's dynamic int8 GEMM through torch's quantized ops: the
activations are quantized to 8 bits on the fly and the product runs in integers, reading a quarter of
float32's weight bytes.

Two choices make it fit a shared core:
- **Per-row activation scales, batch-invariant.** FBGEMM picks one activation range for the whole batch,
  which would make one session's output depend on the rows of whoever shares its forward (irreproducible,
  and a channel between tenants). Each row is first divided by its own largest magnitude, and a sentinel
  row holding +1 and -1 pins the batch's range to [-1, 1]: every row is quantized by the same rule
  whatever it is batched with, and its output is scaled back by its own magnitude.
- **Weight scales that minimise rounding error.** Per output channel, the clipping ratio of max |w| that
  gives the least squared error is searched; a few large weights then no longer coarsen the whole row.

The per-call glue (the row scales, the sentinel, the rescale) runs as one TorchScript function: called from
Python, each of its seven small ops and the GEMM's own op-overload dispatch cost about 2.5 µs, about as much as
FBGEMM's product of one row; TorchScript's interpreter runs the same ops in half the time (a decode step makes
120 such calls in the core and one for the edge's head).

Torch deprecates the quantized tensor dtypes this API packs weights through (pytorch#184982), and TorchScript
with them; Veil pins torch 2.13, where FBGEMM's path is the fastest int8 GEMM torch ships for a CPU (oneDNN's
`onednn.qlinear_pointwise`, fed the same quantized rows, gives the same result 1.2-1.4x slower for one row).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch

from veil.errors import ConfigError
from veil.model.linear import Linear

QUANTIZE = ("none", "int8")
CLIP_RATIOS = torch.linspace(0.5, 1.0, 26)
_QUANTIZE_ROWS = 2048  # rows quantized at once


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU has VNNI dot products; without them FBGEMM's u8·s8 pairs can saturate 16 bits, so the
    activations keep 7 bits (`reduce_range`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def layer_type(quantize: str, setting: str) -> type[Linear] | type[Int8Linear]:
    """The linear layer that `setting` (core.quantize, edge.quantize) asks for; refused early, with the reason,
    where it cannot run (an unknown value, a torch without FBGEMM)."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"{setting} must be one of {', '.join(QUANTIZE)}")
    if quantize == "none":
        return Linear
    if not ({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)):
        raise ConfigError(f"{setting} int8 needs torch's FBGEMM backend (an x86 CPU); "
                          f"this torch has {', '.join(torch.backends.quantized.supported_engines) or 'none'}")
    return Int8Linear


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] float32 -> (int8 [out, in], scale [out]) with w ≈ q · scale, each row's clip searched."""
    if weight.shape[0] > _QUANTIZE_ROWS:  # rows are independent; a block's temporaries stay in cache (8x faster)
        blocks = [_quantize_rows(block) for block in weight.split(_QUANTIZE_ROWS)]
        return torch.cat([q for q, _ in blocks]), torch.cat([s for _, s in blocks])
    return _quantize_rows(weight)


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    peak = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    best_q = torch.zeros_like(w, dtype=torch.int8)
    best_scale = peak[:, 0] / 127
    best_err = torch.full((w.shape[0],), float("inf"))
    for ratio in CLIP_RATIOS:
        scale = peak * ratio / 127
        q = (w / scale).round().clamp(-127, 127)
        err = ((q * scale - w) ** 2).sum(dim=1)
        better = err < best_err
        best_q[better], best_scale[better], best_err[better] = q[better].to(torch.int8), scale[better, 0], err[better]
    return best_q, best_scale


# What a scripted function needs of an `Int8Linear`: (sentinel row, packed weight, reduce_range, bias)
if TYPE_CHECKING:  # the packed weight's TorchBind class is made at run time, out of mypy's sight
    Int8Args = Tuple[torch.Tensor, Any, bool, Optional[torch.Tensor]]
else:
    Int8Args = Tuple[torch.Tensor, torch.classes.quantized.LinearPackedParamsBase, bool, Optional[torch.Tensor]]


@torch.jit.script
def int8_linear(x: torch.Tensor, layer: Int8Args) -> torch.Tensor:
    """x [N, in] float32 -> [N, out] through the layer's `script_args`."""
    sentinel, packed, reduce_range, bias = layer
    # max |x| per row; the same value as the inf-norm, which torch reduces 5-10x slower for 16 rows
    peak = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)
    y = torch.ops.quantized.linear_dynamic(torch.cat((x / peak, sentinel)), packed, reduce_range)
    y = y[:-1].mul_(peak)
    return y if bias is None else y.add_(bias)


class Int8Linear:
    """y = x·Wᵀ + b with W held as per-channel int8 and x quantized per row to 8 bits (7 without VNNI)."""

    __slots__ = ("in_features", "out_features", "script_args")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.device.type != "cpu":
            raise ConfigError("int8 layers run on a CPU only")
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_per_channel(weight)
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # the deprecation of quantized dtypes, named in the module's docstring
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(), zero, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qweight, None)
        # the row that pins every batch's activation range to [-1, 1] (needs in_features >= 2)
        sentinel = torch.zeros(1, self.in_features)
        sentinel[0, 0], sentinel[0, 1] = 1.0, -1.0
        self.script_args: Int8Args = (sentinel, packed, not has_vnni(), None if bias is None else bias.float())

    def residual(self, x: torch.Tensor, inp: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """x + self(inp) (into x when `in_place`), as `Linear.residual` on a CPU."""
        return x.add_(self(inp)) if in_place else x + self(inp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, in] float32 -> [N, out]
        return int8_linear(x, self.script_args)
