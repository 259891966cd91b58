"""A linear layer that is fast for the few-row case of token-by-token decoding on a CPU.

One decode token is a matrix-vector product, bound by reading the weights; a few tokens (a
batch of streams, or one stream's draft tokens) are a thin GEMM. How fast the BLAS runs such
a product depends on the operands' layout, and which layout wins depends on the CPU:

- `nt`: x·Wᵀ, the plain call;
- `nn`: (W·xᵀ)ᵀ, the tall weight on the left. On an AVX2 AMD EPYC, MKL runs this 3.8x faster
  than `nt` for 4 rows of a [49152, 576] LM head (8.0 against 30.8 ms);
- `halves`: W [out, in] viewed as two halves [2, in, out/2], a batched product that torch spreads
  over two threads; for one row it read the weights 1.5x faster than `nt` on the Intel VMs.

So each weight shape is timed once per process, on this machine, for 1, 4, 16 and 64 rows, and
every layer of that shape then uses the winner for its row count (as cuDNN's benchmark mode
picks convolution kernels). The three are the same product in another order of summation:
results agree to float rounding. More than 64 rows (a prefill) take the plain GEMM, which is
parallel already.
"""

from __future__ import annotations

import bisect
import threading
import time

import torch
import torch.nn.functional as F

ROW_BUCKETS = (1, 4, 16, 64)  # a call with n rows uses the plan of the first bucket >= n
KERNELS = ("nt", "nn", "halves")
_TRIES = 5  # timings per kernel and bucket; the fastest counts

_plans: dict[tuple[int, int, torch.dtype, int], tuple[str, ...]] = {}
_plans_lock = threading.Lock()


def _run(kernel: str, x: torch.Tensor, weight: torch.Tensor, halves: torch.Tensor | None) -> torch.Tensor:
    # x [N, in] -> [N, out]
    if kernel == "nn":
        return torch.mm(weight, x.t()).t().contiguous()
    if kernel == "halves" and halves is not None:
        return torch.matmul(x.unsqueeze(0), halves).transpose(0, 1).reshape(x.shape[0], -1)  # [2, N, out/2] -> ...
    return F.linear(x, weight)


def _fastest(weight: torch.Tensor, halves: torch.Tensor | None, rows: int) -> str:
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    best, best_s = "nt", float("inf")
    for kernel in KERNELS:
        if kernel == "halves" and halves is None:
            continue
        _run(kernel, x, weight, halves)  # warm-up: first-touch and packing buffers
        for _ in range(_TRIES):
            start = time.perf_counter()
            _run(kernel, x, weight, halves)
            elapsed = time.perf_counter() - start
            if elapsed < best_s:
                best, best_s = kernel, elapsed
    return best


def plan_for(weight: torch.Tensor, halves: torch.Tensor | None) -> tuple[str, ...]:
    """The fastest kernel per row bucket for this weight's shape, timed once per process."""
    key = (int(weight.shape[0]), int(weight.shape[1]), weight.dtype, torch.get_num_threads())
    with _plans_lock:
        plan = _plans.get(key)
    if plan is None:
        with torch.inference_mode():
            plan = tuple(_fastest(weight, halves, rows) for rows in ROW_BUCKETS)
        with _plans_lock:
            plan = _plans.setdefault(key, plan)
    return plan


class Linear:
    """y = x·Wᵀ + b with W [out, in]; on the CPU, few rows take the kernel timed fastest for this shape."""

    __slots__ = ("weight", "bias", "_halves", "_plan")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        out_features, in_features = weight.shape
        cpu = weight.device.type == "cpu" and weight.is_contiguous()
        split = cpu and out_features % 2 == 0 and torch.get_num_threads() > 1
        # [2, in, out/2] views of the same storage: no copy
        self._halves = weight.view(2, out_features // 2, in_features).transpose(1, 2) if split else None
        self._plan = plan_for(weight, self._halves) if cpu else None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def residual(self, x: torch.Tensor, inp: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        """x + self(inp) (into x when `in_place`); on a GPU the add runs in the GEMM's epilogue (one kernel fewer
        per call, which a decode step of an 8B model makes 64 of; in place, no copy of x either), on a CPU as
        two ops, bit for bit as before."""
        if self.bias is None and x.device.type == "cuda":
            return x.addmm_(inp, self.weight.t()) if in_place else torch.addmm(x, inp, self.weight.t())
        return x.add_(self(inp)) if in_place else x + self(inp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, in] -> [N, out]
        n = x.shape[0]
        if self._plan is None or n > ROW_BUCKETS[-1]:
            return F.linear(x, self.weight, self.bias)
        kernel = self._plan[bisect.bisect_left(ROW_BUCKETS, n)]  # the first bucket >= n (per call: kept cheap)
        y = _run(kernel, x, self.weight, self._halves)
        return y if self.bias is None else y + self.bias
