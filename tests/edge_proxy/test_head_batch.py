"""The LM-head batcher: streams waiting together share one GEMM, each gets its own row's result."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from edge_proxy.compute import ComputeThread
from edge_proxy.head_batch import HeadBatcher
from edge_proxy.metrics import EdgeMetrics


class CountingHead:
    """Stands in for EdgeModel: logits = h·Wᵀ; records the rows of each GEMM and can hold one open."""

    def __init__(self) -> None:
        self.weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        self.gate.wait(5)
        self.calls.append(hidden.shape[0])
        self.threads.add(threading.current_thread().name)
        return hidden @ self.weight.T


def _batcher(head: CountingHead) -> HeadBatcher:
    return HeadBatcher(head, EdgeMetrics(), ComputeThread())  # type: ignore[arg-type]


def test_streams_waiting_together_share_one_gemm_and_get_their_own_rows() -> None:
    head = CountingHead()
    rows = torch.randn(6, 8)

    async def main() -> list[int]:
        batcher = _batcher(head)
        head.gate.clear()  # the first tick holds the GEMM while five more streams arrive
        first = asyncio.create_task(batcher.run(rows[0:1], lambda lg: int(lg[0].argmax())))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.run(rows[i : i + 1], lambda lg: int(lg[0].argmax()))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        head.gate.set()
        return [await first] + [await t for t in rest]

    got = asyncio.run(main())
    assert got == [int(r.argmax()) for r in rows @ head.weight.T]
    assert head.calls == [1, 5]  # one stream alone did not wait; the five that queued shared one GEMM


def test_streams_whose_answers_land_a_few_loop_passes_apart_share_the_first_tick() -> None:
    head = CountingHead()
    rows = torch.randn(3, 8)

    async def main() -> list[int]:
        batcher = _batcher(head)

        async def stream(i: int) -> int:  # stream i reaches the batcher i passes after the first
            for _ in range(i):
                await asyncio.sleep(0)
            return await batcher.run(rows[i : i + 1], lambda lg: int(lg[0].argmax()))

        return list(await asyncio.gather(*(stream(i) for i in range(3))))

    assert asyncio.run(main()) == [int(r.argmax()) for r in rows @ head.weight.T]
    assert head.calls == [3]


def test_one_streams_failure_is_its_own() -> None:
    head = CountingHead()

    def broken(_: torch.Tensor) -> int:
        raise ValueError("this stream's grammar refused")

    async def main():
        batcher = _batcher(head)
        head.gate.clear()
        blocker = asyncio.create_task(batcher.run(torch.randn(1, 8), lambda lg: 0))
        await asyncio.sleep(0.05)
        bad = asyncio.create_task(batcher.run(torch.randn(1, 8), broken))
        good = asyncio.create_task(batcher.run(torch.randn(1, 8), lambda lg: lg.shape[1]))
        gone = asyncio.create_task(batcher.run(torch.randn(1, 8), lambda lg: 1))
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that left: the others are served all the same
        head.gate.set()
        await blocker
        with pytest.raises(ValueError, match="grammar refused"):
            await bad
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await good

    assert asyncio.run(main()) == 50
    assert head.calls == [1, 2]  # the cancelled stream's row was dropped from the tick


def test_a_stream_verifying_drafts_gets_all_its_rows_in_the_shared_gemm() -> None:
    head = CountingHead()
    rows = torch.randn(7, 8)

    async def main() -> tuple[list[int], list[int]]:
        batcher = _batcher(head)
        head.gate.clear()
        blocker = asyncio.create_task(batcher.run(rows[:1], lambda lg: 0))
        await asyncio.sleep(0.05)
        drafted = asyncio.create_task(batcher.run(rows[1:5], lambda lg: lg.argmax(-1).tolist()))
        single = asyncio.create_task(batcher.run(rows[5:6], lambda lg: lg.argmax(-1).tolist()))
        await asyncio.sleep(0.05)
        head.gate.set()
        await blocker
        return await drafted, await single

    drafted, single = asyncio.run(main())
    expected = (rows @ head.weight.T).argmax(-1).tolist()
    assert drafted == expected[1:5] and single == expected[5:6]
    assert head.calls == [1, 5]


def test_every_tick_runs_on_the_one_compute_thread() -> None:
    """Ticks spread over the loop's default executor gave each thread its own OpenMP team and arena."""
    head = CountingHead()
    rows = torch.randn(4, 8)

    async def main() -> None:
        batcher = _batcher(head)
        for _ in range(3):  # waves of streams, with the default executor kept busy between them
            await asyncio.gather(*(batcher.run(rows[i : i + 1], lambda lg: int(lg[0].argmax())) for i in range(4)))
            await asyncio.gather(*(asyncio.to_thread(threading.Event().wait, 0.01) for _ in range(4)))

    asyncio.run(main())
    assert len(head.calls) >= 3 and len(head.threads) == 1
    assert next(iter(head.threads)).startswith("veil-edge-compute")
