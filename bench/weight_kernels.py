"""Torch's own low-precision weight kernels on this CPU, against float32, for the core's layer shapes.

Issue 15 asks for weight-only int8 (and int4 if it pays) through a maintained kernel path. This times, in
one run, one linear layer of SmolLM2-135M's folded blocks (the fused qkv, o, gate+up and down projections)
at 1 row (one decode stream) and 16 rows, with float32 and bfloat16 weights, torch's weight-only int8
matmul (`aten._weight_int8pack_mm`, per-channel scales) and its CPU int4 matmul
(`aten._weight_int4pack_mm_for_cpu`, groups of 32), and the core's `core.quantize: int8` layer (`Int8Linear`:
FBGEMM's int8 GEMM with per-row 8-bit activations). Each is printed as a multiple of float32's time, with
its relative error against float32's output (which shows the quantized weights are read as meant). A
multiple above 1 means the kernel is slower than the float32 it would replace. Each call reads the same
weights, so they come from cache; that flatters float32 against a decode step's weights from memory, so
compare a slow kernel's time with its layer's float32 bytes over the memory bandwidth as well.

    python bench/weight_kernels.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from veil.model.int8 import Int8Linear  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query and 3 key/value heads of 64, MLP 1536
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
GROUP = 32


def _ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def kernels(w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """name -> a call computing x @ w.T with that kernel (weights quantized here, symmetric)."""
    wb, xb = w.bfloat16(), x.bfloat16()
    scale = w.abs().amax(dim=1) / 127
    w8 = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    n, k = w.shape
    groups = w.view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    s4 = ((hi - lo) / 15).clamp(min=1e-8)
    q4 = ((groups - lo[..., None]) / s4[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    # [k/group, n, 2]: scale and zero point, where w = (q - 8) * scale + zero
    scales_zeros = torch.stack([s4.t(), (lo + 8 * s4).t()], dim=-1).contiguous()
    return {
        "float32": lambda: F.linear(x, w),
        "bfloat16": lambda: F.linear(xb, wb),
        "int8 weight-only": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scale),
        "int4 weight-only": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros),
        "int8 Int8Linear": functools.partial(Int8Linear(w), x),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (x float32)")
    for rows in (1, 16):
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, generator=gen) * 0.02
            x = torch.randn(rows, k, generator=gen)
            calls = kernels(w, x)
            ref = calls["float32"]()
            timed = {kernel: _ms(fn, args.repeats) for kernel, fn in calls.items()}
            error = {kernel: float((fn().float() - ref).norm() / ref.norm()) for kernel, fn in calls.items()}
            base = timed["float32"]
            print(f"{rows:>2} rows {name:<8}" + "".join(
                f"  {kernel} {ms:.3f} ms {ms / base:.1f}x err {error[kernel]:.3f}" for kernel, ms in timed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
