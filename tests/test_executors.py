"""The bounded pools: the bound, errors, callers who leave and shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from chronorec.server.core.errors import Overloaded
from chronorec.server.service.executors import BoundedExecutor


def test_results_errors_and_the_bound_on_queued_and_running_work():
    pool = BoundedExecutor("compute", 1, 2, "--max-queued-work=2")
    release = threading.Event()

    async def main():
        assert await pool.run(lambda a, b=0: a + b, 2, b=3) == 5
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        running = asyncio.ensure_future(pool.run(release.wait, 10))
        queued = asyncio.ensure_future(pool.run(lambda: "queued"))
        await asyncio.sleep(0.05)
        assert pool.pending == 2
        with pytest.raises(Overloaded, match="--max-queued-work=2"):
            await pool.run(lambda: None)
        release.set()
        assert await running is True and await queued == "queued"
        assert pool.pending == 0

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_work_whose_caller_left_before_it_started_is_dropped_and_frees_its_slot():
    pool = BoundedExecutor("compute", 1, 4, "--max-queued-work=4")
    release, ran = threading.Event(), []

    async def main():
        busy = asyncio.ensure_future(pool.run(release.wait, 10))
        left = asyncio.ensure_future(pool.run(ran.append, "left"))
        await asyncio.sleep(0.05)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        assert pool.pending == 1  # only the running call counts now
        release.set()
        await busy
        assert await pool.run(ran.append, "next") is None

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()
    assert ran == ["next"]


def test_a_started_call_counts_until_its_thread_is_done_and_shutdown_drops_queued_work():
    pool = BoundedExecutor("store", 1, 4, "--max-queued-work=4")
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(10)

    async def main():
        running = asyncio.ensure_future(pool.run(hold))
        while not started.is_set():
            await asyncio.sleep(0.01)
        running.cancel()  # the caller leaves; the thread is still at work
        await asyncio.sleep(0.05)
        assert pool.pending == 1
        queued = asyncio.ensure_future(pool.run(lambda: "never"))
        await asyncio.sleep(0.05)
        closing = asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        with pytest.raises(asyncio.CancelledError):
            await queued  # dropped by the shutdown while the running call goes on
        release.set()
        await closing
        assert pool.pending == 0
        with pytest.raises(RuntimeError):
            await pool.run(lambda: None)

    asyncio.run(main())
