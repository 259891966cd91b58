"""The edge's tensor work on one long-lived thread.

`asyncio.to_thread` hands work to whichever of the loop's default-executor threads is free (up to
six on two cores), and each such thread that runs torch gets its own OpenMP team, its own malloc
arena and its own kernels' thread-local scratch. Over a soak the edge's RSS then climbed in steps,
one per thread that first ran a head GEMM, for minutes before it settled. The LM head's ticks, the
prefill's logits and edge-run blocks run one after another anyway (torch spreads each over the
cores), so they share one thread here, and the edge's memory stops depending on which threads
happened to be free. The price: a long prompt's log-probabilities hold the next head tick back
until they are done, where before the two shared the cores.

The model is loaded on this thread too (`call`). torch's CPU build uses GNU OpenMP, which keeps a
team of worker threads for each thread that ever ran a parallel op, for as long as that thread
lives. Once a process holds more such threads than it has CPUs, every team's workers stop spinning
between ops and sleep on a futex instead: a load on the main thread made each later head GEMM on
this one wait on wake-ups, and FBGEMM's int8 products ran 2-3x slower. One team per process keeps
them spinning. A thread other than this one that fills a vocabulary-sized tensor is enough (torch fills
above 32,768 elements in parallel): vectors made on the event loop or a request's worker thread come from
`zeros`, which NumPy fills.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from typing import Callable, ParamSpec, TypeVar

import numpy as np
import torch

P = ParamSpec("P")
T = TypeVar("T")


class ComputeThread:
    """One worker thread for the model's tensor work; `run` awaits a call made on it."""

    def __init__(self, name: str = "veil-edge-compute"):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # the caller's context variables travel with the call, as with asyncio.to_thread
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the thread and wait for it, from outside an event loop (the model's load at start)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Queued calls are dropped; a call already running finishes on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def zeros(size: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero vector filled by NumPy, for a thread that must not start an OpenMP team (see above)."""
    return torch.from_numpy(np.zeros(size, dtype=torch.empty((), dtype=dtype).numpy().dtype))
