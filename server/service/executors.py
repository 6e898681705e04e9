"""Bounded thread pools that run the engine's blocking work for the asyncio servicers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from chronorec.server.core.errors import Overloaded

T = TypeVar("T")


class BoundedExecutor:
    """A thread pool that refuses work (errors.Overloaded) once `max_pending` items are queued or running.

    An item counts until its thread is done with it, not until its caller stops waiting: a call
    whose client left frees its slot only when the work it started ends, so the bound is a bound
    on threads' work, never on callers' patience. Work that has not started when its caller
    leaves is dropped (asyncio cancels the wrapped future, which the pool then never runs).
    """

    def __init__(self, name: str, workers: int, max_pending: int, flag: str):
        self.name = name
        self.max_pending = max_pending
        self._flag = flag
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Work items queued or running now."""
        return self._pending

    def _done(self, _future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on a pool thread; Overloaded at once when the pool is full."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise Overloaded(
                    f"the server's {self.name} threads have {self._pending} calls queued or running; "
                    f"retry later ({self._flag})"
                )
            self._pending += 1
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)  # type: ignore[arg-type]
            raise
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Drop queued work and wait for running work to end."""
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Executors:
    """The servicers' pools: `compute` for ranking and encoding, `store` for SQLite and the model repository.

    Two pools, so a database that stalls writes (locked by another process, slow disk) can hold
    only the store threads, while Recommend and Encode keep theirs.
    """

    compute: BoundedExecutor
    store: BoundedExecutor

    @classmethod
    def create(cls, workers: int, store_workers: int, max_queued_work: int, flag: str) -> "Executors":
        return cls(
            compute=BoundedExecutor("compute", workers, max_queued_work, flag),
            store=BoundedExecutor("store", store_workers, max_queued_work, flag),
        )

    def shutdown(self) -> None:
        self.compute.shutdown()
        self.store.shutdown()
