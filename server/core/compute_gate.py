"""One thread at a time through the GIL-bound part of a request; a thread waiting on the encoder steps out meanwhile."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class ComputeGate:
    """A lock around Python-bound request work, re-entrant per thread, that its holder can step out of.

    A cached Recommend is ~2 ms of Python under the GIL. Four of them at once on four threads
    do not run any faster, but the threads hand the GIL to each other at every numpy call
    that releases it: in-process at 10k items on two busy cores, four threads cost 2.4-4.5 ms
    of CPU per call against 2.0-2.2 ms for one, and each call waits out other threads' switch
    intervals (with a lock around the call, four cost what one does: 2.3-2.5 ms). Behind
    this gate the calls take turns whole, and a waiting thread sleeps on the lock instead of
    contending for the GIL. A call that waits on something that runs elsewhere (the encoder's
    micro-batches) steps out for the wait, so cold users never hold cached ones up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def held(self) -> bool:
        """Whether this thread is inside the gate."""
        return getattr(self._local, "held", False)

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Run the block inside the gate (at once when this thread already is)."""
        if self.held:
            yield
            return
        self._lock.acquire()
        self._local.held = True
        try:
            yield
        finally:
            self._local.held = False
            self._lock.release()

    @contextmanager
    def stepped_out(self) -> Iterator[None]:
        """Run the block outside the gate, then come back in (nothing when not inside)."""
        if not self.held:
            yield
            return
        self._local.held = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._local.held = True


# The process's one gate for Recommend: the GIL it stands in front of is per process too.
RECOMMEND_GATE = ComputeGate()
