"""Online metrics per model version: signed recommendation ids, attribution of feedback, sliding-window figures."""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import os
import secrets
import threading
import time
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from chronorec.server.core.catalog import Event, Impression

log = logging.getLogger("chronorec.online")

# Actions of an event that answers a recommendation: a click is counted for CTR and MRR, the
# others as conversions.
CLICK_ACTIONS = frozenset({"click"})
CONVERSION_ACTIONS = frozenset({"like", "purchase"})
ATTRIBUTED_ACTIONS = CLICK_ACTIONS | CONVERSION_ACTIONS

KEY_FILE = "recommendation.key"
_KEY_BYTES = 32
_NONCE_BYTES = 9  # 12 characters of base64url
_NONCE_BLOCK = 256  # nonces per draw of system randomness
_MAC_BYTES = 12  # 96 bits: a made-up id passes with probability 2^-96
# Buckets of the sliding window: the window moves in steps of window / _BUCKETS.
_BUCKETS = 60


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_or_create_key(root: str | os.PathLike) -> bytes:
    """The secret that signs recommendation ids, kept in the model repository so every replica
    sharing it (and a restarted server) recognises the ids any of them issued; created once, 0600."""
    path = Path(root) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(_KEY_BYTES)
        tmp = path.with_name(f".{KEY_FILE}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails when another process created the key first: then its key is the one.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        key = path.read_bytes()
    if len(key) < 16:
        raise ValueError(f"{path} holds {len(key)} bytes; a recommendation key needs at least 16 (delete it to make a new one)")
    return key


class RecommendationIds:
    """Issues and checks recommendation ids: `<version>.<nonce>.<mac>`.

    The MAC covers the version, the nonce and the user the recommendation was made for, so an
    id names its model version by itself (any replica, and a restarted server, can attribute
    feedback to it without a look-up), and an id that was made up, altered, or is sent with
    another user's events does not verify and is not attributed.
    """

    def __init__(self, key: bytes):
        self._key = bytes(key)
        # Nonces are cut from a block of system randomness drawn _NONCE_BLOCK at a time: one
        # os.urandom per Recommend released and re-took the GIL on every call, which the
        # event loop's thread then held for a while (~4% of a cached Recommend's CPU, py-spy).
        self._random = b""
        self._random_at = 0
        self._random_lock = threading.Lock()

    def _mac(self, version: str, nonce: str, user_id: str) -> str:
        message = f"{version}\x00{nonce}\x00{user_id}".encode("utf-8", "surrogatepass")
        # hmac.new, not the one-shot hmac.digest: with a digest named by string that looks the
        # algorithm up on every call and measured ~20% slower here (10.5 against 12.7 µs).
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES])

    def _nonce(self) -> bytes:
        with self._random_lock:
            at = self._random_at
            if at + _NONCE_BYTES > len(self._random):
                self._random, at = secrets.token_bytes(_NONCE_BYTES * _NONCE_BLOCK), 0
            self._random_at = at + _NONCE_BYTES
            return self._random[at : at + _NONCE_BYTES]

    def issue(self, version: str, user_id: str | None) -> str:
        nonce = _b64(self._nonce())
        return f"{version}.{nonce}.{self._mac(version, nonce, user_id or '')}"

    def version_of(self, recommendation_id: str, user_id: str) -> str | None:
        """The version that issued `recommendation_id` for `user_id` (or for an anonymous
        request), or None when the id does not verify."""
        parts = recommendation_id.rsplit(".", 2)
        if len(parts) != 3 or not all(parts):
            return None
        version, nonce, mac = parts
        for owner in (user_id, ""):
            if hmac.compare_digest(mac, self._mac(version, nonce, owner)):
                return version
        return None


class ServedLog:
    """What recent recommendations returned (id -> user, items), at most `capacity` of them, so a
    click without a position gets the rank its item was served at. Least recently issued go first."""

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._entries: collections.OrderedDict[str, tuple[str, tuple[str, ...]]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def record(self, recommendation_id: str, user_id: str | None, item_ids: Sequence[str]) -> None:
        if not self.capacity:
            return
        with self._lock:
            self._entries[recommendation_id] = (user_id or "", tuple(item_ids))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def position(self, recommendation_id: str, item_id: str) -> int | None:
        """1-based rank of `item_id` in that recommendation, None when unknown."""
        with self._lock:
            entry = self._entries.get(recommendation_id)
        if entry is None or item_id not in entry[1]:
            return None
        return entry[1].index(item_id) + 1

    def forget_user(self, user_id: str) -> int:
        """Drop every recommendation made for `user_id` (erasure); returns how many."""
        with self._lock:
            gone = [rid for rid, (owner, _) in self._entries.items() if owner == user_id]
            for rid in gone:
                del self._entries[rid]
        return len(gone)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Figures:
    """Counts of one version over some span, and the rates made of them."""

    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    reciprocal_rank_sum: float = 0.0
    clicks_with_position: int = 0
    seconds: float = 0.0

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def conversion_rate(self) -> float:
        return self.conversions / self.impressions if self.impressions else 0.0

    @property
    def mrr(self) -> float:
        return self.reciprocal_rank_sum / self.clicks_with_position if self.clicks_with_position else 0.0

    def __sub__(self, other: "Figures") -> "Figures":
        return Figures(
            self.impressions - other.impressions,
            self.clicks - other.clicks,
            self.conversions - other.conversions,
            self.reciprocal_rank_sum - other.reciprocal_rank_sum,
            self.clicks_with_position - other.clicks_with_position,
            self.seconds,
        )


class _Counts:
    __slots__ = ("impressions", "clicks", "conversions", "rr_sum", "rr_count")

    def __init__(self) -> None:
        self.impressions = self.clicks = self.conversions = self.rr_count = 0
        self.rr_sum = 0.0

    def add(self, other: "_Counts") -> None:
        self.impressions += other.impressions
        self.clicks += other.clicks
        self.conversions += other.conversions
        self.rr_sum += other.rr_sum
        self.rr_count += other.rr_count

    def figures(self, seconds: float) -> Figures:
        return Figures(self.impressions, self.clicks, self.conversions, self.rr_sum, self.rr_count, seconds)


class OnlineMetrics:
    """Impressions, clicks, conversions and clicked ranks per model version.

    Two views: a sliding window of `window_s` seconds (what GetStatus and Prometheus show; it
    moves in steps of window/60, by the server's monotonic clock, in the order feedback arrives)
    and running totals since the server started (a canary compares the growth of the two
    versions' totals since it began). Memory: 60 buckets per version with feedback in the
    window, plus one total per version ever attributed.
    """

    def __init__(self, window_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise ValueError(f"the online metrics window must be positive, got {window_s!r}")
        self.window_s = float(window_s)
        self._bucket_s = self.window_s / _BUCKETS
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, collections.deque[tuple[int, _Counts]]] = {}
        self._totals: dict[str, _Counts] = {}
        self.unattributed = 0

    def _bucket(self, version: str) -> _Counts:
        # Caller holds the lock.
        index = int(self._clock() // self._bucket_s)
        ring = self._buckets.setdefault(version, collections.deque())
        if not ring or ring[-1][0] != index:
            ring.append((index, _Counts()))
            while ring and ring[0][0] <= index - _BUCKETS:
                ring.popleft()
        return ring[-1][1]

    def _counts(self, version: str) -> tuple[_Counts, _Counts]:
        return self._bucket(version), self._totals.setdefault(version, _Counts())

    def impression(self, version: str) -> None:
        with self._lock:
            for counts in self._counts(version):
                counts.impressions += 1

    def click(self, version: str, position: int | None) -> None:
        with self._lock:
            for counts in self._counts(version):
                counts.clicks += 1
                if position is not None and position >= 1:
                    counts.rr_sum += 1.0 / position
                    counts.rr_count += 1

    def conversion(self, version: str) -> None:
        with self._lock:
            for counts in self._counts(version):
                counts.conversions += 1

    def not_attributed(self, count: int = 1) -> None:
        with self._lock:
            self.unattributed += count

    def window(self) -> dict[str, Figures]:
        """Per version with feedback in the window, its figures over the window."""
        with self._lock:
            floor = int(self._clock() // self._bucket_s) - _BUCKETS
            out = {}
            for version, ring in list(self._buckets.items()):
                while ring and ring[0][0] <= floor:
                    ring.popleft()
                if not ring:
                    del self._buckets[version]
                    continue
                total = _Counts()
                for _, counts in ring:
                    total.add(counts)
                out[version] = total.figures(self.window_s)
            return out

    def totals(self, version: str) -> Figures:
        """The version's figures since the server started."""
        with self._lock:
            counts = self._totals.get(version)
            return counts.figures(0.0) if counts is not None else Figures()


@dataclass(frozen=True)
class RecommendationRef:
    """The recommendation a Feedback event answers, and the position it names (None: not given)."""

    recommendation_id: str
    position: int | None = None


class FeedbackAttribution:
    """Names each recommendation, and credits the feedback that answers it to the version that made it."""

    def __init__(self, ids: RecommendationIds, metrics: OnlineMetrics, served: ServedLog):
        self.ids = ids
        self.metrics = metrics
        self.served = served

    @classmethod
    def for_repository(cls, root: str | os.PathLike, window_s: float, served_capacity: int) -> "FeedbackAttribution":
        """Ids signed with the repository's key; a repository that cannot be written gets a key of
        this process alone (ids then lose their attribution across restarts and replicas)."""
        try:
            key = load_or_create_key(root)
        except OSError as exc:
            log.warning("recommendation ids are signed with a key of this process only (%s): %s", root, exc)
            key = secrets.token_bytes(_KEY_BYTES)
        return cls(RecommendationIds(key), OnlineMetrics(window_s), ServedLog(served_capacity))

    def issue(self, version: str, user_id: str | None, item_ids: Sequence[str]) -> str:
        """A new recommendation id for what `version` returned to `user_id`."""
        recommendation_id = self.ids.issue(version, user_id)
        self.served.record(recommendation_id, user_id, item_ids)
        return recommendation_id

    def attribute(self, events: Sequence[Event], sources: Mapping[str, RecommendationRef],
                  impressions: Sequence[Impression]) -> None:
        """Count newly stored feedback: each impression, and each click, like or purchase whose
        event id `sources` maps to a recommendation, for the version whose id verifies (anything
        else carrying an id is counted as not attributed)."""
        for impression in impressions:
            version = self.ids.version_of(impression.recommendation_id, impression.user_id)
            if version is None:
                self.metrics.not_attributed()
            else:
                self.metrics.impression(version)
        for event in events:
            ref = sources.get(event.event_id)
            if ref is None or event.action not in ATTRIBUTED_ACTIONS:
                continue
            version = self.ids.version_of(ref.recommendation_id, event.user_id)
            if version is None:
                self.metrics.not_attributed()
            elif event.action in CLICK_ACTIONS:
                position = ref.position or self.served.position(ref.recommendation_id, event.item_id)
                self.metrics.click(version, position)
            else:
                self.metrics.conversion(version)

    def forget_user(self, user_id: str) -> None:
        self.served.forget_user(user_id)


__all__ = [
    "ATTRIBUTED_ACTIONS",
    "CLICK_ACTIONS",
    "CONVERSION_ACTIONS",
    "FeedbackAttribution",
    "Figures",
    "OnlineMetrics",
    "RecommendationIds",
    "RecommendationRef",
    "ServedLog",
    "load_or_create_key",
]
