"""A writer-preferring readers-writer lock: parallel readers, exclusive writers."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class ReadWriteLock:
    """Many readers or one writer at a time; a waiting writer blocks new readers.

    Writer preference keeps a steady stream of searches from starving catalog updates.
    The lock is not reentrant: a thread must not take `read()` or `write()` again while
    it holds either (a nested read behind a waiting writer would deadlock). A nested
    `write()` is detected and raises instead of hanging.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writers_waiting = 0
        self._writer: int | None = None  # thread id of the writer holding the lock

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                raise RuntimeError("ReadWriteLock.write() is not reentrant")
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
