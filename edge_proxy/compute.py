"""The edge's tensor work on one long-lived thread.

`asyncio.to_thread` hands work to whichever of the loop's default-executor threads is free (up to
six on two cores), and each such thread that runs torch gets its own OpenMP team, its own malloc
arena and its own kernels' thread-local scratch. Over a soak the edge's RSS then climbed in steps,
one per thread that first ran a head GEMM, for minutes before it settled. The LM head's ticks, the
prefill's logits and edge-run blocks run one after another anyway (torch spreads each over the
cores), so they share one thread here, and the edge's memory stops depending on which threads
happened to be free. The price: a long prompt's log-probabilities hold the next head tick back
until they are done, where before the two shared the cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from typing import Callable, ParamSpec, TypeVar

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

    def close(self) -> None:
        """Queued calls are dropped; a call already running finishes on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
