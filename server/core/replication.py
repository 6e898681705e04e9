"""Replicas that follow one shared change log: LISTEN wakes them, a catch-up by sequence number misses nothing."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from chronorec.server.core.stores import SharedLog

log = logging.getLogger("chronorec.replication")

# Changes read per catch-up query. At ~2000 events a page costs ~20 ms to read and apply, so a
# replica that fell a million changes behind catches up in well under a minute.
PAGE = 2000
_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class FollowerStatus:
    """How far a replica has followed the log, for GetStatus and the metrics."""

    applied_seq: int  # every change up to this seq is in memory
    known_seq: int  # the newest seq this replica has heard of (a notification or a read)
    connected: bool  # listening now; False while the store is unreachable
    changes_applied: int
    reconnects: int
    last_error: str


class LogFollower:
    """Applies every change of a shared log after `cursor` to this replica's memory, in seq order.

    A thread of its own holds a LISTEN connection. Each notification (a commit anywhere, with the
    newest seq as payload) wakes it to read `changes_since(cursor)` page by page and hand each
    page to `apply`, then move the cursor past it. Seqs are gap-free and commit in order, so the
    catch-up never skips a change, whatever notifications were missed: after a reconnect or a
    restart it simply reads from its cursor again. A read every `poll_interval_s` runs even
    without a notification, as a backstop.

    `apply` must be idempotent per change: the replica's own writes are already in memory when
    their changes come back through the log (the engine compares per-item seqs, and the
    interaction state ignores event ids it holds).
    """

    def __init__(self, store: SharedLog, apply: Callable[[list], None], cursor: int, *,
                 poll_interval_s: float = 2.0, max_backoff_s: float = 2.0):
        self.store = store
        self.apply = apply
        self.poll_interval_s = poll_interval_s
        self.max_backoff_s = max_backoff_s
        self._cursor = int(cursor)
        self._known = int(cursor)
        self._connected = False
        self._changes_applied = 0
        self._reconnects = 0
        self._last_error = ""
        self._advanced = threading.Condition()
        self._stop = threading.Event()
        self._last_logged = -math.inf
        self._thread = threading.Thread(target=self._run, name="log-follower", daemon=True)

    @property
    def cursor(self) -> int:
        return self._cursor

    def start(self) -> LogFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def status(self) -> FollowerStatus:
        return FollowerStatus(self._cursor, max(self._known, self._cursor), self._connected,
                              self._changes_applied, self._reconnects, self._last_error)

    def wait_for(self, seq: int, timeout: float | None = None) -> bool:
        """Block until every change up to `seq` is applied; False when `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._advanced:
            while self._cursor < seq:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._advanced.wait(remaining)
        return True

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            listener = None
            try:
                # LISTEN before the catch-up: a change committed after the read then still wakes us.
                listener = self.store.open_listener()
                if self._reconnects or self._last_error:
                    log.info("following the change log again from seq %d", self._cursor)
                self._connected = True
                self._last_error = ""
                self._catch_up()
                backoff = 0.05
                self._listen(listener)
            except Exception as exc:  # the store is unreachable or restarting: retry with backoff
                self._connected = False
                self._reconnects += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._log_failure(exc)
                self._stop.wait(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
            finally:
                if listener is not None:
                    try:
                        listener.close()
                    except Exception:  # a broken connection may fail to close; it is gone either way
                        pass
        self._connected = False

    def _listen(self, listener) -> None:
        last_read = time.monotonic()
        while not self._stop.is_set():
            # A short wait, so stop() is answered quickly; an idle replica reads once per poll interval.
            woke = False
            for notification in listener.notifies(timeout=0.25, stop_after=1):
                woke = True
                try:
                    self._known = max(self._known, int(notification.payload))
                except ValueError:
                    pass
            if woke or time.monotonic() - last_read >= self.poll_interval_s:
                self._catch_up()
                last_read = time.monotonic()

    def _catch_up(self) -> None:
        while not self._stop.is_set():
            page = self.store.changes_since(self._cursor, PAGE)
            if not page:
                return
            self.apply(page)
            with self._advanced:
                self._cursor = page[-1].seq
                self._known = max(self._known, self._cursor)
                self._changes_applied += len(page)
                self._advanced.notify_all()
            if len(page) < PAGE:
                return

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY_S:
            self._last_logged = now
            log.error("change log follower stopped at seq %d: %s: %s; reconnecting", self._cursor,
                      type(exc).__name__, exc)


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica of the service as GetStatus reports it."""

    name: str
    serving_version: str
    applied_seq: int
    heartbeat_age_s: float
    this_replica: bool


class ReplicaHeartbeat:
    """Registers this replica in the shared store every `interval_s` (name, serving version, how
    far it followed the log) and keeps the list of live replicas, those heard from within
    `3 * interval_s`, for GetStatus and the version-skew metric."""

    def __init__(self, store: SharedLog, name: str, describe: Callable[[], tuple[str, int]], *,
                 interval_s: float = 2.0, started_at: float | None = None):
        self.store = store
        self.name = name
        self.describe = describe
        self.interval_s = interval_s
        self.started_at = time.time() if started_at is None else started_at
        self._replicas: list[ReplicaInfo] = []
        self._beaten_version = ""
        self._stop = threading.Event()
        self._last_logged = -math.inf
        self._thread = threading.Thread(target=self._run, name="replica-heartbeat", daemon=True)

    def start(self) -> ReplicaHeartbeat:
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.store.forget_replica(self.name)
        except Exception as exc:  # an unreachable store forgets this replica by its age instead
            log.warning("could not unregister replica %s: %s", self.name, exc)

    def replicas(self) -> list[ReplicaInfo]:
        """The live replicas at the last heartbeat (this one included once it has beaten)."""
        return list(self._replicas)

    def beat(self) -> None:
        version, applied = self.describe()
        self._beaten_version = version
        try:
            self.store.heartbeat(self.name, version, applied, self.started_at)
            records = self.store.replicas(max_age_s=3 * self.interval_s)
        except Exception as exc:  # the store is down: keep serving, report what was last known
            now = time.monotonic()
            if now - self._last_logged >= _LOG_EVERY_S:
                self._last_logged = now
                log.warning("replica heartbeat failed: %s", exc)
            return
        self._replicas = [ReplicaInfo(r.name, r.serving_version, r.applied_seq, max(0.0, r.heartbeat_age_s),
                                      r.name == self.name) for r in records]

    def _run(self) -> None:
        last = time.monotonic()
        # Checked often, so a swap shows in the other replicas' GetStatus at once, not a beat later.
        while not self._stop.wait(min(0.25, self.interval_s)):
            if time.monotonic() - last >= self.interval_s or self.describe()[0] != self._beaten_version:
                self.beat()
                last = time.monotonic()


def version_skew(replicas: list[ReplicaInfo]) -> int:
    """Distinct serving versions among live replicas that serve one, less one: 0 when they agree."""
    versions = {r.serving_version for r in replicas if r.serving_version}
    return max(0, len(versions) - 1)
