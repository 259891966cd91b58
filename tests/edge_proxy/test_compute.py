"""The edge's compute thread: one thread for all calls, results and errors come back, context travels."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from edge_proxy.compute import ComputeThread

REQUEST = contextvars.ContextVar("request", default="none")


def test_calls_run_one_at_a_time_on_one_thread_with_the_callers_context() -> None:
    compute = ComputeThread()
    seen: list[tuple[str, str]] = []
    running = threading.Semaphore(1)

    def work(i: int) -> int:
        assert running.acquire(blocking=False), "two calls ran at once"
        try:
            seen.append((threading.current_thread().name, REQUEST.get()))
            threading.Event().wait(0.005)
            return i * i
        finally:
            running.release()

    async def one(i: int) -> int:
        REQUEST.set(f"r{i}")
        return await compute.run(work, i)

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        assert asyncio.run(main()) == [i * i for i in range(6)]
    finally:
        compute.close()
    assert {name for name, _ in seen} == {seen[0][0]} and seen[0][0].startswith("veil-edge-compute")
    assert sorted(req for _, req in seen) == [f"r{i}" for i in range(6)]


def test_an_error_in_a_call_reaches_its_caller_and_the_thread_goes_on() -> None:
    compute = ComputeThread()

    def fails() -> None:
        raise ValueError("bad rows")

    async def main() -> str:
        with pytest.raises(ValueError, match="bad rows"):
            await compute.run(fails)
        return await compute.run(str.upper, "still here")

    try:
        assert asyncio.run(main()) == "STILL HERE"
    finally:
        compute.close()


def test_after_close_no_call_is_taken() -> None:
    compute = ComputeThread()
    compute.close()

    async def main() -> None:
        await compute.run(str.upper, "late")

    with pytest.raises(RuntimeError):
        asyncio.run(main())
