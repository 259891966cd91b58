"""SessionShare: the per-key cap, the share a key may take while others want sessions, and who a freed one goes to."""

from __future__ import annotations

import asyncio

import pytest

from edge_proxy.admission import SessionShare
from veil.errors import RateLimited, ServiceUnavailable


async def _pending(share: SessionShare, key: str) -> asyncio.Task[None]:
    task = asyncio.create_task(share.take(key))
    await asyncio.sleep(0)  # let it queue
    return task


async def _spin() -> None:
    for _ in range(5):  # a grant reaches its task through shield and wait_for: a few loop turns
        await asyncio.sleep(0)


def test_a_key_alone_may_use_every_session_but_not_its_own_cap() -> None:
    async def main() -> None:
        share = SessionShare(4, share=0.5, wait_s=0)
        for _ in range(4):
            await share.take("a")
        assert share.active["a"] == 4
        with pytest.raises(ServiceUnavailable) as busy:
            await share.take("a")
        assert busy.value.status_code == 503 and busy.value.headers["retry-after"] == "1"
        capped = SessionShare(8, per_key=2)
        await capped.take("a")
        await capped.take("a")
        with pytest.raises(RateLimited) as exc:
            await capped.take("a")
        assert exc.value.code == "concurrency_limit_exceeded"
        with pytest.raises(RateLimited):
            await capped.take("b", cap=0)  # a key's own cap wins over the deployment's
        await capped.take("b", cap=3)
        await capped.take("b", cap=3)
        await capped.take("b", cap=3)
    asyncio.run(main())


def test_one_key_cannot_starve_another() -> None:
    """The defect: one key with many long requests took every session and the next key was refused."""
    async def main() -> None:
        share = SessionShare(4, share=0.5, wait_s=5)
        for _ in range(4):
            await share.take("greedy")  # alone: it may fill the edge
        more_greedy = [await _pending(share, "greedy") for _ in range(3)]
        polite = await _pending(share, "polite")
        share.give("greedy")  # the first session to free goes to the key holding none, not to the queue's head
        await _spin()
        assert polite.done() and share.active["polite"] == 1
        assert not any(t.done() for t in more_greedy)
        # with no other key waiting, a freed session is never kept idle: greedy's own waiter takes it
        share.give("greedy")
        await _spin()
        assert share.total == 4 and sum(t.done() for t in more_greedy) == 1
        # but while another key waits, greedy (over its share of 2) gets nothing until that key is served
        late = await _pending(share, "late")
        share.give("greedy")
        await _spin()
        assert late.done() and sum(t.done() for t in more_greedy) == 1
        share.give("polite")
        await _spin()
        assert sum(t.done() for t in more_greedy) == 2 and share.total == 4
        for t in more_greedy:
            t.cancel()
        await asyncio.gather(*more_greedy, return_exceptions=True)
    asyncio.run(main())


def test_freed_sessions_go_to_the_key_holding_fewest_then_first_come() -> None:
    async def main() -> None:
        share = SessionShare(3, share=1.0, wait_s=5)
        await share.take("a")
        await share.take("a")
        await share.take("b")
        a3 = await _pending(share, "a")
        c1 = await _pending(share, "c")
        b2 = await _pending(share, "b")
        share.give("a")
        await _spin()
        assert c1.done() and not a3.done() and not b2.done()  # c holds none
        share.give("a")
        await _spin()
        assert a3.done() and not b2.done()  # a and b hold one each now; a came first
        share.give("c")
        await _spin()
        assert b2.done()
    asyncio.run(main())


def test_a_waiter_that_leaves_or_times_out_holds_nothing() -> None:
    async def main() -> None:
        share = SessionShare(1, wait_s=0.05)
        await share.take("a")
        with pytest.raises(ServiceUnavailable):
            await share.take("b")
        gone = await _pending(share, "b")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert share.waiting == 0
        share.give("a")
        assert share.total == 0 and not share.active
        await share.take("b")  # nothing stale was granted to the one that left
        assert share.active == {"b": 1}
    asyncio.run(main())


def test_many_keys_take_and_give_concurrently_and_end_empty() -> None:
    async def main() -> None:
        share = SessionShare(5, per_key=3, share=0.5, wait_s=10)
        peak = 0

        async def one(key: str) -> None:
            nonlocal peak
            try:
                await share.take(key)
            except RateLimited:
                return
            peak = max(peak, share.total)
            assert share.total <= 5 and share.active[key] <= 3
            await asyncio.sleep(0.001)
            share.give(key)

        await asyncio.gather(*(one(f"k{i % 7}") for i in range(300)))
        assert share.total == 0 and share.waiting == 0 and peak == 5
    asyncio.run(main())
