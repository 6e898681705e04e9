"""What each dashboard page shows, read from the engine in process: plain data, no HTTP and no HTML."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from chronorec.client import rules
from chronorec.server.config import Limits
from chronorec.server.core.catalog import Item
from chronorec.server.core.engine import ChronorecEngine, Recommendations, ServingStatus, SimilarItems, VersionStatus
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.itemtext import item_text
from chronorec.server.core.ranking import RecommendQuery
from chronorec.server.core.similar import SimilarQuery
from chronorec.server.core.timetext import HistoryEntry
from chronorec.server.service.convert import check_action, check_id

DAY = rules.SECONDS_PER_DAY
# The user picker lists at most this many ids (the field also takes any id typed in).
USERS_LISTED = 1000
# History events the preview lists beside the recommendations (the newest ones).
HISTORY_SHOWN = 200
# The item page's trend chart: this many buckets over this many days before its time.
TREND_BUCKETS = 30
TREND_DAYS = 120


@dataclass(frozen=True)
class StatusView:
    """The Status page: serving state, versions side by side, swap history and counts."""

    status: ServingStatus
    versions: list[VersionStatus]
    swap_history: list[str]  # versions in the order they were activated, newest last
    catalog_items: int
    events: int
    users: int
    offline_metric_names: list[str]
    online_window_s: float
    ready: bool


def status_view(engine: ChronorecEngine) -> StatusView:
    """Reads the model repository from disk: run it on the store threads."""
    versions = engine.list_versions()
    names = sorted({name for v in versions for name in v.metrics})
    return StatusView(
        status=engine.status(),
        versions=versions,
        swap_history=engine.repository.history(),
        catalog_items=len(engine.catalog),
        events=engine.state.event_count,
        users=len(engine.state.users()),
        offline_metric_names=names,
        online_window_s=engine.online.metrics.window_s,
        ready=engine.ready.is_set(),
    )


def user_ids(engine: ChronorecEngine) -> list[str]:
    """Users with events, for the picker (sorted, at most USERS_LISTED)."""
    return sorted(engine.state.users())[:USERS_LISTED]


@dataclass(frozen=True)
class SliderRange:
    """The time slider's bounds (whole UTC days) and position, in unix seconds."""

    start: float
    end: float
    at: float


@dataclass(frozen=True)
class HistoryRow:
    entry: HistoryEntry
    title: str
    category: str
    visible: bool  # at or before `at`: what the ranker read


@dataclass(frozen=True)
class PreviewView:
    """The User preview: top-k as of `at`, the history the ranker read and the text the encoder read."""

    user_id: str
    inline_text: str
    k: int
    answer: Recommendations
    history: list[HistoryRow]
    history_length: int
    history_text: str
    slider: SliderRange


def parse_inline_history(text: str, at: float, limits: Limits) -> list[HistoryEntry]:
    """Lines `ITEM_ID [ACTION] [TIME]`, oldest first; TIME is unix seconds or an ISO date or
    date-time (UTC). The n-th of N lines, when it has no time, is placed N - n + 1 minutes before
    `at`: untimed lines keep their order and the last is a minute old."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) > limits.max_history_events:
        raise InvalidArgument(f"{len(lines)} history lines exceed max_history_events={limits.max_history_events}")
    entries = []
    for number, line in enumerate(lines, start=1):
        parts = line.split()  # ids may hold commas, never spaces
        where = f"history line {number}"
        item_id = check_id(parts[0], f"{where}: item id")
        action = check_action(parts[1], where) if len(parts) > 1 else "view"
        if len(parts) > 3:
            raise InvalidArgument(f"{where}: expected `ITEM_ID [ACTION] [TIME]`")
        stamp = parse_time(parts[2], f"{where}: time") if len(parts) > 2 else at - 60.0 * (len(lines) - number + 1)
        entries.append(HistoryEntry(item_id=item_id, action=action, timestamp=stamp))
    return entries


def parse_time(text: str, what: str) -> float:
    """Unix seconds, or an ISO 8601 date or date-time taken as UTC when it names no zone."""
    from datetime import datetime, timezone

    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"{what} must be unix seconds or an ISO date, got {text[:40]!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = moment.timestamp()
    problem = rules.time_problem(seconds)
    if problem:
        raise InvalidArgument(f"{what} {problem}")
    return float(seconds)


def _whole_days(start: float, end: float) -> tuple[float, float]:
    return math.floor(start / DAY) * DAY, math.ceil(end / DAY) * DAY


def preview_view(engine: ChronorecEngine, limits: Limits, user_id: str, inline_text: str, at: float | None,
                 k: int, now: float | None = None) -> PreviewView:
    """Recommend for a user (and/or an inline history) as of `at` (default now), with the history
    and the history text the serving version read. Blocking: run it on the compute threads."""
    now = time.time() if now is None else now
    user_id = check_id(user_id.strip(), "user id", required=False)
    if not (1 <= k <= min(limits.max_k, 100)):
        raise InvalidArgument(f"k must be between 1 and {min(limits.max_k, 100)}, got {k}")
    stored = engine.state.history(user_id, math.inf) if user_id else []
    at = now if at is None else at
    inline = parse_inline_history(inline_text, at, limits) if inline_text.strip() else []
    if not user_id and not inline:
        raise InvalidArgument("pick a user or paste a history")
    query = RecommendQuery(user_id=user_id or None, k=k, at=at, inline_history=inline)
    answer = engine.recommend(query)
    # The version that answered, read again for its history and text: the canary split is by
    # user, so the same user meets the same version (a swap in between is shown by the version name).
    with engine.manager.acquire_for(user_id or None) as model:
        resolved = query.resolved(model.manifest.time_model)
        history = model.ranker.history_for(resolved)
        text = model.ranker.short_term_text(history, at, resolved.params) if history else ""
    times = [e.timestamp for e in stored] + [e.timestamp for e in inline]
    first = min(times) if times else at - 30 * DAY
    start, end = _whole_days(min(first, at), max(max(times) if times else at, at, now))
    rows = []
    everything = sorted(stored + [e for e in inline], key=lambda e: e.timestamp)
    for entry in everything[-HISTORY_SHOWN:]:
        item = engine.catalog.get(entry.item_id)
        rows.append(HistoryRow(entry, item.title if item else entry.item_id, item.category if item else "",
                               entry.timestamp <= at))
    return PreviewView(
        user_id=user_id,
        inline_text=inline_text,
        k=k,
        answer=answer,
        history=list(reversed(rows)),
        history_length=answer.result.history_length,
        history_text=text,
        slider=SliderRange(start, end, at),
    )


@dataclass(frozen=True)
class TrendBucket:
    start: float
    end: float
    events: int


@dataclass(frozen=True)
class ItemView:
    """The Item page: the item, its availability as of `at`, its trend and its neighbours."""

    item: Item
    text: str  # what the encoder reads for it
    at: float
    available: bool
    trend: list[TrendBucket]
    total_events: int
    similar: SimilarItems | None
    similar_error: str


def item_view(engine: ChronorecEngine, item_id: str, at: float | None, k: int = 10, now: float | None = None) -> ItemView:
    """Blocking (the similar items encode when the index lacks the item): run it on the compute threads."""
    at = (time.time() if now is None else now) if at is None else at
    item = engine.get_item(check_id(item_id, "item id"))
    width = TREND_DAYS * DAY / TREND_BUCKETS
    trend = []
    for n in range(TREND_BUCKETS):
        end = at - (TREND_BUCKETS - 1 - n) * width
        # trend_counts counts [end - width, end], both ends included: nudge the start so that
        # an event on a boundary counts in one bucket only.
        count = int(engine.state.trend_counts(end, width - 1e-6, [item.item_id])[0])
        trend.append(TrendBucket(end - width, end, count))
    total = int(engine.state.all_time_counts(at, [item.item_id])[0])
    similar, error = None, ""
    try:
        similar = engine.similar_items(SimilarQuery(k=k, at=at, item_id=item.item_id))
    except InvalidArgument as exc:  # e.g. a zero vector: the page still shows the item
        error = exc.message
    return ItemView(item, item_text(item), at, item.available_at(at), trend, total, similar, error)
