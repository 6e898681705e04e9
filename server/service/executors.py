"""Bounded thread pools that run the engine's blocking work for the asyncio servicers."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from chronorec.server.core.errors import Overloaded

T = TypeVar("T")


class _Work:
    """One call's function and where its result goes."""

    __slots__ = ("fn", "args", "kwargs", "loop", "future", "started", "dropped")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.loop, self.future = loop, future
        self.started = self.dropped = False


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    # On the caller's event loop; a caller that left has cancelled its future already.
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class BoundedExecutor:
    """A thread pool that refuses work (errors.Overloaded) once `max_pending` items are queued or running.

    An item counts until its thread is done with it, not until its caller stops waiting: a call
    whose client left frees its slot only when the work it started ends, so the bound is a bound
    on threads' work, never on callers' patience. Work that has not started when its caller
    leaves is dropped (its slot freed at once; no thread runs it).

    The hop is a queue and the caller's own asyncio future, settled through
    call_soon_threadsafe: concurrent.futures' Future with asyncio.wrap_future cost ~110 µs of
    CPU per call more on two busy cores (a lock, a condition and two chained futures per call),
    about a tenth of a cached Recommend. Threads start as work needs them, up to `workers`.
    """

    def __init__(self, name: str, workers: int, max_pending: int, flag: str):
        if workers <= 0:
            raise ValueError("workers must be greater than 0")
        self.name = name
        self.max_pending = max_pending
        self._flag = flag
        self._workers = workers
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def pending(self) -> int:
        """Work items queued or running now."""
        return self._pending

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on a pool thread; Overloaded at once when the pool is full."""
        loop = asyncio.get_running_loop()
        work = _Work(fn, args, kwargs, loop, loop.create_future())
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} pool is shut down")
            if self._pending >= self.max_pending:
                raise Overloaded(
                    f"the server's {self.name} threads have {self._pending} calls queued or running; "
                    f"retry later ({self._flag})"
                )
            self._pending += 1
            if self._idle:
                self._idle -= 1  # an idle thread will take it
            elif len(self._threads) < self._workers:
                thread = threading.Thread(target=self._worker, name=f"{self.name}_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put(work)
        try:
            return await work.future
        except asyncio.CancelledError:
            with self._lock:
                if not work.started and not work.dropped:
                    work.dropped = True
                    self._pending -= 1
            raise

    def _worker(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            with self._lock:
                if work.dropped:
                    self._idle += 1
                    continue
                work.started = True
            result, error = None, None
            try:
                result = work.fn(*work.args, **work.kwargs)
            except BaseException as caught:  # handed to the caller, as concurrent.futures does
                error = caught
            # Counted out before the caller can see the result: a caller that awaited its work
            # finds it no longer pending (counting it out after settling raced with the caller).
            with self._lock:
                self._pending -= 1
                self._idle += 1
            try:
                work.loop.call_soon_threadsafe(_settle, work.future, result, error)
            except RuntimeError:
                pass  # the caller's loop is closed: no one is waiting
            del work, result, error

    def shutdown(self) -> None:
        """Drop queued work and wait for running work to end."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                break
            if work is None:
                continue
            with self._lock:
                if work.started or work.dropped:
                    continue
                work.dropped = True
                self._pending -= 1
            try:
                work.loop.call_soon_threadsafe(work.future.cancel)
            except RuntimeError:
                pass
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()


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
