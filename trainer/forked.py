"""A second process for the evaluation's pure-Python stretches (one core each): forked, so it starts
with this process's data as it is, and hands its results back through files."""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from chronorec.trainer.resources import release_free_heap

log = logging.getLogger(__name__)

Here = TypeVar("Here")
There = TypeVar("There")


class EncoderNeeded(RuntimeError):
    """Forked work reached a text its parent did not encode (an encoder's threads do not survive a
    fork, so the child never encodes)."""


def refuse_to_encode(texts: list[str]) -> np.ndarray:
    """The encoder a forked child's replay holds."""
    raise EncoderNeeded(f"{len(texts)} text(s) not encoded before the fork")


def refusing_encoder(replay) -> Callable[[], None]:
    """What a forked child runs first (beside's `in_child`): `replay`'s encoder swapped for
    `refuse_to_encode`."""
    return functools.partial(setattr, replay, "encode", refuse_to_encode)


def can_fork() -> bool:
    """Fork only where it is the platform's own way (Linux): macOS's system libraries are not fork-safe."""
    # A daemonic process (a multiprocessing worker) may not start children.
    return (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon)


def workers_for(workers: int | None) -> int:
    """Processes to use: `workers`, or up to two by the CPUs when None; 1 where fork is not available."""
    n = min(2, os.cpu_count() or 1) if workers is None else workers
    return n if can_fork() else 1


class Forked:
    """`work(folder)` in a forked process while this one goes on with the `with` block; `wait()`
    gives None once the child has finished (its files are in `folder` until the block ends), or why
    it failed (an exception, a crash). The caller then does the child's part itself, so a failure
    costs time, never a result.

    Before the fork, garbage is collected and free heap pages handed back: a page both processes
    map is copied when either writes it, and this process's next allocations would otherwise land
    in freed pages the child still maps (the child's memory counts in the evaluation's peak,
    resources.children_private_by_pid). The objects alive then are frozen for the child's collector,
    whose full collections would otherwise write to, and so copy, every page of objects it inherited.
    """

    def __init__(self, work: Callable[[Path], None], *, name: str):
        self.work, self.name = work, name
        self._child = None
        self._receive = None
        self._status: str | None = None

    def __enter__(self) -> "Forked":
        self._folder = tempfile.TemporaryDirectory(prefix=f"chronorec-{self.name}-")
        self.folder = Path(self._folder.name)
        gc.collect()
        release_free_heap()
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self._child = context.Process(target=_run, args=(self.work, self.folder, send), name=self.name, daemon=True)
        gc.freeze()
        try:
            self._child.start()
        except (OSError, AssertionError) as error:  # out of processes or memory: the caller does the work
            self._child = None
            self._status = f"the process did not start ({type(error).__name__}: {error})"
        finally:
            gc.unfreeze()
        send.close()
        self.work = None  # the child holds its own copy of whatever the work refers to
        return self

    def wait(self) -> str | None:
        if self._status is None and self._child is not None:
            try:
                self._status = self._receive.recv()
            except EOFError:  # it died before answering
                self._child.join(timeout=30)
                self._status = f"it exited with code {self._child.exitcode} without an answer"
            self._close()
        return None if self._status == "ok" else self._status

    def _close(self) -> None:
        if self._receive is not None:
            self._receive.close()
            self._receive = None
        if self._child is not None:
            self._child.join(timeout=30)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()

    def __exit__(self, *exc) -> None:
        if self._child is not None and self._status is None and self._child.is_alive():
            self._child.kill()  # the block failed: nobody will read the child's results
        self._close()
        self._folder.cleanup()


def beside(here: Callable[[], Here], there: Callable[[], There], *, name: str,
           in_child: Callable[[], None] | None = None) -> tuple[Here, There]:
    """(here(), there()): there() is computed meanwhile in a forked process, after `in_child` (say,
    swapping the child's replay encoder for `refuse_to_encode`), and its result handed back
    pickled. A child that fails is logged and there() then runs here, after here(): the same
    results, only later."""

    def work(folder: Path) -> None:
        if in_child is not None:
            in_child()
        with open(folder / "result.pkl", "wb") as stored:
            pickle.dump(there(), stored, protocol=pickle.HIGHEST_PROTOCOL)

    with Forked(work, name=name) as child:
        mine = here()
        failure = child.wait()
        if failure is None:
            with open(child.folder / "result.pkl", "rb") as stored:
                return mine, pickle.load(stored)
    log.warning("%s: the second process failed (%s): its part is computed here", name, failure)
    return mine, there()


def _run(work: Callable[[Path], None], folder: Path, send) -> None:
    try:
        work(folder)
        send.send("ok")
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which does the work itself
        send.send(f"{type(error).__name__}: {error}")
    finally:
        send.close()


__all__ = ["EncoderNeeded", "Forked", "beside", "can_fork", "refuse_to_encode", "refusing_encoder", "workers_for"]
