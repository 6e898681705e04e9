"""Tests of the time-aware ranking, the as-of interaction state and the co-occurrence model."""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from chronorec.server.core.catalog import Event, Item
from chronorec.server.core.catalog_state import CatalogState
from chronorec.server.core.cooccurrence import CooccurrenceModel
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.itemtext import item_text_lookup
from chronorec.server.core.manifest import TimeModelParams
from chronorec.server.core.ranking import RecommendQuery, TimeAwareRanker
from chronorec.server.core.timetext import HISTORY_SEPARATOR, HistoryEntry

DAY = 86400.0
NOW = 1_700_000_000.0
TOPICS = ("space", "cooking", "jazz", "football")
DIM = 16
ITEMS_PER_TOPIC = 12


# ------------------------------------------------------------ test doubles


class TopicEncoder:
    """Deterministic stand-in for the BERT encoder: topic keywords → one-hot, plus hash noise.

    Earlier segments of a history text (newest first) weigh more, as a sequence model
    would weigh recent events, so the short-term vector follows recent interest.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.stack([self._one(text) for text in texts])

    @staticmethod
    def _one(text: str) -> np.ndarray:
        vector = np.zeros(DIM, dtype=np.float32)
        for position, segment in enumerate(text.split(HISTORY_SEPARATOR)):
            weight = 1.0 / (1.0 + position)
            lowered = segment.lower()
            for t, topic in enumerate(TOPICS):
                vector[t] += weight * lowered.count(topic)
            digest = hashlib.sha256(segment.encode()).digest()
            noise = np.frombuffer(digest[: DIM - len(TOPICS)], dtype=np.uint8) / 255.0 - 0.5
            vector[len(TOPICS) :] += 0.1 * weight * noise
        return vector / max(np.linalg.norm(vector), 1e-9)


def topic_of(item_id: str) -> str:
    return item_id.split("-")[0]


def make_items() -> list[Item]:
    items = []
    for topic in TOPICS:
        for i in range(ITEMS_PER_TOPIC):
            items.append(
                Item(
                    item_id=f"{topic}-{i:02d}",
                    title=f"{topic.title()} story {i}",
                    category=topic,
                    # Published between 200 and 90 days before NOW, so all are live at NOW-60d.
                    published_at=NOW - (200 - 10 * i) * DAY,
                )
            )
    return items


def background_events() -> list[Event]:
    """Users who each stay in one topic, so co-occurrence links items of a topic."""
    events = []
    rng = np.random.default_rng(1)
    for u in range(40):
        topic = TOPICS[u % len(TOPICS)]
        chosen = rng.choice(ITEMS_PER_TOPIC, size=6, replace=False)
        for n, i in enumerate(chosen):
            events.append(
                Event(f"bg{u}-{n}", f"bg{u}", f"{topic}-{i:02d}", "view", NOW - (150 - u - n) * DAY, None)
            )
    return events


def shifting_user_events(user: str = "alice") -> list[Event]:
    """Space fan long ago (100–60 days before NOW), jazz fan in the last 10 days."""
    events = []
    for n in range(8):
        events.append(Event(f"{user}-s{n}", user, f"space-{n:02d}", "like", NOW - (100 - 5 * n) * DAY, None))
    for n in range(5):
        events.append(Event(f"{user}-j{n}", user, f"jazz-{n:02d}", "like", NOW - (10 - 2 * n) * DAY, None))
    return events


def make_ranker(items=None, events=None, cooccurrence=True, encoder=None):
    items = make_items() if items is None else items
    events = background_events() + shifting_user_events() if events is None else events
    catalog = CatalogState(items)
    encoder = encoder or TopicEncoder()
    item_text_of = item_text_lookup(catalog)
    index = ItemIndex(DIM, initial_capacity=16)
    index.upsert([i.item_id for i in items], encoder([item_text_of(i.item_id) for i in items]))
    state = InteractionState()
    state.add(events)
    model = CooccurrenceModel.fit(events, [i.item_id for i in items]) if cooccurrence else None
    # exhaustive_below=0: the tiny test catalog must exercise the candidate path too.
    return TimeAwareRanker(catalog, index, state, model, encoder, item_text_of, exhaustive_below=0)


def query(user_id="alice", k=5, at=NOW, **kwargs) -> RecommendQuery:
    kwargs.setdefault("params", TimeModelParams())
    return RecommendQuery(user_id=user_id, k=k, at=at, **kwargs)


def topics(result) -> Counter:
    return Counter(topic_of(r.item_id) for r in result.items)


# ------------------------------------------------------------------ ranking


@pytest.mark.parametrize("exhaustive", [False, True])
def test_interest_shift_follows_the_request_time(exhaustive):
    ranker = make_ranker()
    now = ranker.recommend(query(at=NOW, exhaustive=exhaustive))
    assert topics(now).most_common(1)[0] == ("jazz", 5)
    before_the_move = ranker.recommend(query(at=NOW - 50 * DAY, exhaustive=exhaustive))
    assert topics(before_the_move).most_common(1)[0][0] == "space"
    assert topics(before_the_move)["space"] >= 4
    assert before_the_move.history_length == 8 and now.history_length == 13


def test_candidate_path_agrees_with_exhaustive_scoring():
    ranker = make_ranker()
    for at in (NOW, NOW - 50 * DAY):
        fast = ranker.recommend(query(at=at, k=8))
        full = ranker.recommend(query(at=at, k=8, exhaustive=True))
        assert [r.item_id for r in fast.items] == [r.item_id for r in full.items]


def test_events_after_at_are_ignored():
    at = NOW - 50 * DAY
    past_only = [e for e in background_events() + shifting_user_events() if e.timestamp <= at]
    with_future = make_ranker()
    without_future = make_ranker(events=past_only)
    # The same co-occurrence model for both, so only the event log differs.
    without_future.set_cooccurrence(with_future.cooccurrence)
    for exhaustive in (False, True):
        a = with_future.recommend(query(at=at, k=10, exhaustive=exhaustive))
        b = without_future.recommend(query(at=at, k=10, exhaustive=exhaustive))
        assert a == b


@pytest.mark.parametrize("exhaustive", [False, True])
def test_unpublished_and_expired_items_are_never_returned(exhaustive):
    items = make_items() + [
        Item("space-future", "Space story future", category="space", published_at=NOW + DAY),
        Item("space-expired", "Space story expired", category="space", published_at=NOW - 300 * DAY, expires_at=NOW - DAY),
        Item("space-timeless", "Space story timeless", category="space"),
    ]
    ranker = make_ranker(items=items)
    everything = query(user_id="alice", k=len(items), params=TimeModelParams(w_semantic=5.0))
    returned = {r.item_id for r in ranker.recommend(query(k=len(items), exhaustive=exhaustive)).items}
    assert "space-future" not in returned and "space-expired" not in returned
    assert "space-timeless" in returned
    # Cold start goes through the same filter.
    cold = {r.item_id for r in ranker.recommend(query(user_id=None, k=len(items))).items}
    assert "space-future" not in cold and "space-expired" not in cold
    # Either side of its window the same item is fine.
    later = {r.item_id for r in ranker.recommend(RecommendQuery(**{**everything.__dict__, "at": NOW + 2 * DAY})).items}
    assert "space-future" in later
    earlier = {r.item_id for r in ranker.recommend(RecommendQuery(**{**everything.__dict__, "at": NOW - 2 * DAY})).items}
    assert "space-expired" in earlier
    # An item published exactly at `at` is live; one expiring exactly at `at` is not.
    edge = ranker.recommend(RecommendQuery(**{**everything.__dict__, "at": NOW + DAY})).items
    assert "space-future" in {r.item_id for r in edge}
    edge = ranker.recommend(RecommendQuery(**{**everything.__dict__, "at": NOW - DAY})).items
    assert "space-expired" not in {r.item_id for r in edge}


def test_new_events_change_the_next_recommendation():
    ranker = make_ranker()
    first = ranker.recommend(query())
    top = first.items[0].item_id
    ranker.state.add([Event("fresh-1", "alice", top, "purchase", NOW - 60, None)])
    second = ranker.recommend(query())
    assert top not in {r.item_id for r in second.items}  # now seen
    assert second.history_length == first.history_length + 1
    # A burst of football in the last hour brings football in at the top.
    assert topics(second)["football"] == 0
    ranker.state.add(
        [Event(f"fb-{n}", "alice", f"football-{n:02d}", "like", NOW - 3600 + n, None) for n in range(4)]
    )
    third = ranker.recommend(query())
    assert topic_of(third.items[0].item_id) == "football"


def test_seen_items_are_excluded_unless_repeats_are_allowed():
    ranker = make_ranker()
    seen = {e.item_id for e in shifting_user_events()}
    plain = ranker.recommend(query(k=10))
    assert not seen & {r.item_id for r in plain.items}
    repeats = ranker.recommend(query(k=10, allow_repeats=True))
    assert seen & {r.item_id for r in repeats.items}


def test_exclude_and_category_filters():
    ranker = make_ranker()
    base = ranker.recommend(query(k=5))
    excluded = frozenset(r.item_id for r in base.items[:3])
    filtered = ranker.recommend(query(k=5, exclude=excluded))
    assert not excluded & {r.item_id for r in filtered.items}
    cooking = ranker.recommend(query(k=5, categories=frozenset({"cooking"})))
    assert len(cooking.items) == 5 and topics(cooking) == Counter({"cooking": 5})
    # A filter that leaves fewer than k items returns what is left.
    few = ranker.recommend(query(k=50, categories=frozenset({"football"})))
    assert len(few.items) == ITEMS_PER_TOPIC and topics(few) == Counter({"football": ITEMS_PER_TOPIC})
    assert ranker.recommend(query(k=5, categories=frozenset({"no-such-category"}))).items == []


def test_cold_start_returns_trending_then_fresh():
    ranker = make_ranker()
    at = NOW - 130 * DAY
    trend_only = TimeModelParams().with_overrides({"w_freshness": 0.0, "w_trend": 1.0})
    cold = ranker.recommend(query(user_id="nobody", k=5, at=at, params=trend_only))
    assert cold.history_length == 0
    window = trend_only.trend_window_days * DAY
    live = {i.item_id for i in make_items() if i.available_at(at)}
    counts = {item: c for item, c in ranker.state.trending(at, window, 100) if item in live}
    assert [counts.get(r.item_id, 0) for r in cold.items] == sorted(counts.values(), reverse=True)[:5]
    assert all(r.semantic == 0 and r.cooccurrence == 0 and r.top_history == [] for r in cold.items)

    fresh_only = TimeModelParams().with_overrides({"w_freshness": 1.0, "w_trend": 0.0})
    fresh = ranker.recommend(query(user_id=None, k=4, at=NOW, params=fresh_only))
    assert {r.item_id for r in fresh.items} == {f"{t}-{ITEMS_PER_TOPIC - 1:02d}" for t in TOPICS}
    assert fresh.items[0].freshness == pytest.approx(2 ** (-90 / fresh_only.freshness_half_life_days), rel=1e-4)


def test_anonymous_inline_history_is_used():
    ranker = make_ranker()
    inline = tuple(HistoryEntry(f"cooking-{n:02d}", "view", NOW - n * DAY) for n in range(4))
    result = ranker.recommend(query(user_id=None, inline_history=inline))
    assert result.history_length == 4
    assert topics(result)["cooking"] == 5
    assert not {r.item_id for r in result.items} & {e.item_id for e in inline}
    # Inline entries after `at` are ignored like stored ones.
    future = inline + (HistoryEntry("football-00", "view", NOW + DAY),)
    assert ranker.recommend(query(user_id=None, inline_history=future)).history_length == 4


def test_inline_history_merges_with_stored_history_without_duplicates():
    ranker = make_ranker()
    stored = ranker.state.history("alice", NOW)
    resent = (HistoryEntry(stored[-1].item_id, stored[-1].action, stored[-1].timestamp, stored[-1].value),)
    extra = (HistoryEntry("cooking-00", "view", NOW - 60),)
    merged = ranker.history_for(query(inline_history=resent + extra))
    assert len(merged) == len(stored) + 1 and merged[-1].item_id == "cooking-00"


def test_overrides_change_the_ranking():
    ranker = make_ranker()
    default = ranker.recommend(query(k=5))
    long_term_only = ranker.recommend(query(k=5, params=TimeModelParams().with_overrides({"alpha": 0.0, "long_term_half_life_days": 3650.0, "w_cooccurrence": 0.0, "w_trend": 0.0})))
    # With a ten-year half-life the 8 old space events outweigh the 5 recent jazz ones:
    # all 4 unseen space items come first.
    assert topics(default)["jazz"] == 5
    assert [topic_of(r.item_id) for r in long_term_only.items[:4]] == ["space"] * 4
    trend_only = ranker.recommend(query(k=5, params=TimeModelParams().with_overrides({"w_semantic": 0.0, "w_cooccurrence": 0.0, "w_freshness": 0.0, "w_trend": 1.0})))
    assert all(r.score == pytest.approx(r.trend) for r in trend_only.items)
    assert [r.item_id for r in trend_only.items] != [r.item_id for r in default.items]
    with pytest.raises(InvalidArgument):
        TimeModelParams().with_overrides({"alpha": 2.0})


@pytest.mark.parametrize("exhaustive", [False, True])
def test_personal_terms_fade_with_the_time_since_the_users_newest_event(exhaustive):
    """Alice's newest event is 2 days before NOW. Sixty days later, with a 7-day personal half-life,
    what is popular now outranks her old session; right after her session it does not."""
    trend_events = [Event(f"t{n}", f"fan{n}", "football-00", "view", NOW + 55 * DAY + n * 60.0, None) for n in range(30)]
    ranker = make_ranker(events=background_events() + shifting_user_events() + trend_events)
    params = TimeModelParams(w_trend=0.3, personal_half_life_days=7.0)
    soon = ranker.recommend(query(at=NOW, k=5, params=params, exhaustive=exhaustive))
    assert topics(soon)["jazz"] == 5  # 2 days after: the personal terms keep 2^(-2/7) of their weight
    late = ranker.recommend(query(at=NOW + 60 * DAY, k=5, params=params, exhaustive=exhaustive))
    assert late.items[0].item_id == "football-00"
    off = ranker.recommend(query(at=NOW + 60 * DAY, k=5, params=replace(params, personal_half_life_days=0.0),
                                 exhaustive=exhaustive))
    assert "football-00" not in [r.item_id for r in off.items]  # without the fade the old session wins
    scale = 2.0 ** (-62.0 / 7.0)
    for r in late.items:
        expected = scale * (params.w_semantic * r.semantic + params.w_cooccurrence * r.cooccurrence) + (
            params.w_freshness * r.freshness + params.w_trend * r.trend)
        assert r.score == pytest.approx(expected, rel=1e-5, abs=1e-9)
    with pytest.raises(InvalidArgument):
        TimeModelParams().with_overrides({"personal_half_life_days": -1.0})


def test_scores_and_reasons_are_consistent():
    ranker = make_ranker()
    params = TimeModelParams()
    result = ranker.recommend(query(k=5, params=params))
    history_items = {e.item_id for e in shifting_user_events()}
    for r in result.items:
        expected = (
            params.w_semantic * r.semantic
            + params.w_cooccurrence * r.cooccurrence
            + params.w_freshness * r.freshness
            + params.w_trend * r.trend
        )
        assert r.score == pytest.approx(expected, rel=1e-5)
        assert 0 <= r.cooccurrence <= 1 and 0 <= r.trend <= 1 and 0 <= r.freshness <= 1
        assert 1 <= len(r.top_history) <= 3
        assert {h.item_id for h in r.top_history} <= history_items
        contributions = [h.contribution for h in r.top_history]
        assert contributions == sorted(contributions, reverse=True)
        assert all(h.title == ranker.catalog[h.item_id].title for h in r.top_history)
        # A jazz recommendation is explained by the jazz history.
        assert topic_of(r.top_history[0].item_id) == topic_of(r.item_id)
    assert [r.score for r in result.items] == sorted((r.score for r in result.items), reverse=True)


def test_ties_are_broken_by_item_id():
    items = [Item(f"same-{i}", "Same", category="x") for i in (3, 1, 2, 0)]
    ranker = make_ranker(items=items, events=[], cooccurrence=False)
    result = ranker.recommend(query(user_id=None, k=3))
    assert [r.item_id for r in result.items] == ["same-0", "same-1", "same-2"]


def test_short_term_vector_is_cached_by_history_text():
    encoder = TopicEncoder()
    ranker = make_ranker(encoder=encoder)
    calls = encoder.calls
    first = ranker.recommend(query())
    second = ranker.recommend(query(at=NOW + 60))  # same relative phrases
    assert not first.used_cache and second.used_cache and encoder.calls == calls + 1
    ranker.state.add([Event("new", "alice", "jazz-09", "view", NOW + 120, None)])
    third = ranker.recommend(query(at=NOW + 180))
    assert not third.used_cache and encoder.calls == calls + 2
    # A precomputed short-term vector skips the encoder.
    given = ranker.recommend(query(short_term_vector=encoder(["jazz"])[0]))
    assert not given.used_cache and encoder.calls == calls + 3
    # alpha = 0 never needs the short-term vector.
    ranker.recommend(query(at=NOW + 10 * DAY, params=TimeModelParams(alpha=0.0)))
    assert encoder.calls == calls + 3


def test_recommend_without_cooccurrence_model_and_with_unindexed_items():
    ranker = make_ranker(cooccurrence=False)
    ranker.index.delete(["jazz-11"])
    result = ranker.recommend(query(k=len(make_items()), exhaustive=True))
    by_id = {r.item_id: r for r in result.items}
    assert by_id["jazz-11"].semantic == 0.0  # still rankable by freshness/trend
    assert all(r.cooccurrence == 0.0 for r in result.items)


def test_invalid_queries_are_rejected():
    ranker = make_ranker()
    with pytest.raises(InvalidArgument):
        ranker.recommend(query(k=0))
    with pytest.raises(InvalidArgument):
        ranker.recommend(query(at=math.nan))


def test_catalog_changes_are_seen_by_exhaustive_scoring():
    ranker = make_ranker()
    before = {r.item_id for r in ranker.recommend(query(user_id=None, k=100)).items}
    ranker.catalog.upsert([Item("brand-new", "Jazz story new", category="jazz", published_at=NOW - 60)])
    ranker.catalog.delete(["space-00"])
    after = {r.item_id for r in ranker.recommend(query(user_id=None, k=100)).items}
    assert after == (before - {"space-00"}) | {"brand-new"}


def test_score_candidates_covers_every_rankable_item():
    ranker = make_ranker()
    scored = ranker.score_candidates(query(exhaustive=True))
    seen = {e.item_id for e in shifting_user_events()}
    assert set(scored.item_ids) == {i.item_id for i in make_items()} - seen
    assert len(scored.score) == len(scored.item_ids)


# -------------------------------------------------------- interaction state


def _event(event_id, user, item, ts, action="view"):
    return Event(event_id, user, item, action, float(ts), None)


def test_interaction_state_is_an_as_of_view():
    state = InteractionState()
    state.add([_event("1", "u", "a", 10), _event("2", "u", "b", 30), _event("3", "v", "a", 20)])
    state.add([_event("4", "u", "c", 20)])  # arrives late, lands in time order
    assert [e.item_id for e in state.history("u", 100)] == ["a", "c", "b"]
    assert [e.item_id for e in state.history("u", 20)] == ["a", "c"]
    assert [e.item_id for e in state.history("u", 100, limit=2)] == ["c", "b"]
    assert state.history("u", 5) == [] and state.history("ghost", 100) == []
    assert state.seen_items("u", 25) == {"a", "c"}
    assert state.user_event_count("u", 25) == 2 and len(state) == state.event_count == 4
    assert state.add([_event("1", "u", "a", 10)]) == 0  # duplicate event id
    assert state.user_items(25) == {"u": ["a", "c"], "v": ["a"]}


def test_equal_timestamps_keep_arrival_order():
    state = InteractionState()
    state.add([_event("1", "u", "a", 10), _event("2", "u", "b", 10)])
    state.add([_event("3", "u", "c", 10), _event("4", "u", "d", 5)])
    assert [e.item_id for e in state.history("u", 10)] == ["d", "a", "b", "c"]


def test_trend_counts_and_trending_as_of_time():
    state = InteractionState()
    events = [_event("a1", "u1", "a", 100), _event("a2", "u2", "a", 101), _event("a3", "u3", "a", 102)]
    events += [_event("b1", "u1", "b", 195), _event("b2", "u2", "b", 200)]
    events += [_event("c1", "u1", "c", 190), _event("c2", "u3", "c", 50), _event("c3", "u4", "c", 60)]
    events += [_event("d1", "u9", "d", 300)]  # the future for every query below
    state.add(events)
    counts = state.trend_counts(200, 10, ["a", "b", "c", "d", "zzz"])
    assert counts.tolist() == [0, 2, 1, 0, 0]  # window [190, 200] includes both ends
    assert state.all_time_counts(200, ["a", "b", "c", "d"]).tolist() == [3, 2, 3, 0]
    # b leads the window; c beats a on the window; a is still listed by all-time count.
    assert state.trending(200, 10, 3) == [("b", 2), ("c", 1), ("a", 0)]
    # Tie on window (0) and all-time (3): item id decides.
    assert state.trending(150, 10, 2) == [("a", 0), ("c", 0)]
    # A late event changes counts of the past.
    state.add([_event("late", "u5", "a", 199)])
    assert state.trend_counts(200, 10, ["a"]).tolist() == [1]
    assert state.trending(40, 10, 5) == []
    ids = state.item_ids()
    for at, window, n in ((200, 10, 3), (150, 10, 2), (40, 10, 5), (300, 1000, 9)):
        assert [ids[i] for i in state.trending_positions(at, window, n)] == [i for i, _ in state.trending(at, window, n)]


def test_trending_is_the_top_n_by_window_then_all_time_count_then_id():
    rng = np.random.default_rng(8)
    state = InteractionState()
    items = [f"t{j:03d}" for j in range(300)]
    state.add([_event(f"e{k}", f"u{k % 40}", items[int(j)], float(t))
               for k, (j, t) in enumerate(zip(rng.zipf(1.3, size=3000) % 300, rng.uniform(0, 1000, size=3000)))])
    for at, window, n in ((1000, 50, 10), (1000, 5, 40), (500, 1, 25), (1000, 1000, 299), (20, 3, 5), (1000, 0.5, 60)):
        window_counts = dict(zip(items, state.trend_counts(at, window, items).tolist()))
        totals = dict(zip(items, state.all_time_counts(at, items).tolist()))
        expected = sorted((i for i in items if totals[i] > 0), key=lambda i: (-window_counts[i], -totals[i], i))[:n]
        assert [i for i, _ in state.trending(at, window, n)] == expected


def test_interaction_state_replays_a_large_log_fast():
    rng = np.random.default_rng(0)
    n = 100_000
    users = rng.integers(0, 1000, n)
    items = rng.integers(0, 1700, n)
    times = np.sort(rng.uniform(0, 200 * DAY, n))
    events = [Event(str(i), f"u{users[i]}", f"i{items[i]}", "rating", float(times[i]), 4.0) for i in range(n)]
    state = InteractionState()
    started = time.perf_counter()
    for start in range(0, n, 1000):
        state.add(events[start : start + 1000])
        state.trend_counts(times[start], 7 * DAY)
    for q in range(300):
        at = float(times[rng.integers(0, n)])
        state.history(f"u{q}", at)
        state.trend_counts(at, 7 * DAY, [f"i{j}" for j in range(100)])
        state.trending(at, 7 * DAY, 20)
    assert time.perf_counter() - started < 10


# ------------------------------------------------------------- co-occurrence


TINY = {"u1": ["a", "b"], "u2": ["a", "b", "c"], "u3": ["a", "c", "a"], "u4": ["d"]}


@pytest.mark.parametrize("dense_max_items", [100, 0])
def test_cooccurrence_is_the_cosine_of_the_binary_matrix(dense_max_items):
    model = CooccurrenceModel.fit(TINY, ["a", "b", "c", "d"], max_neighbors=None, dense_max_items=dense_max_items)
    # users(a)={1,2,3}, users(b)={1,2}, users(c)={2,3}, users(d)={4}; repeats count once.
    expected = np.array(
        [
            [0, 2 / math.sqrt(6), 2 / math.sqrt(6), 0],
            [2 / math.sqrt(6), 0, 1 / 2, 0],
            [2 / math.sqrt(6), 1 / 2, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    ids = ["a", "b", "c", "d"]
    np.testing.assert_allclose(model.pair_similarities(ids, ids), expected, atol=1e-6)
    scores = model.scores({"a": 1.0, "b": 0.5}, ["c", "d", "unknown"])
    np.testing.assert_allclose(scores, [2 / math.sqrt(6) + 0.25, 0, 0], atol=1e-6)
    np.testing.assert_allclose(model.scores({"a": 1.0}), expected[0], atol=1e-6)
    assert model.neighbours(["a", "d", "zzz"], 1) == {"a": [("b", pytest.approx(2 / math.sqrt(6)))], "d": []}
    contributors = model.top_contributors({"a": 1.0, "b": 0.5}, ["c", "d"])
    assert contributors[0] == [("a", pytest.approx(2 / math.sqrt(6))), ("b", pytest.approx(0.25))]
    assert contributors[1] == []


def test_cooccurrence_from_events_equals_from_sequences_and_ignores_unknown_items():
    events = [_event(f"{u}{n}", u, item, n) for u, items in TINY.items() for n, item in enumerate(items)]
    from_events = CooccurrenceModel.fit(events + [_event("x", "u1", "gone", 9)], ["a", "b", "c", "d"])
    from_sequences = CooccurrenceModel.fit(TINY, ["a", "b", "c", "d"])
    ids = ["a", "b", "c", "d"]
    np.testing.assert_allclose(from_events.pair_similarities(ids, ids), from_sequences.pair_similarities(ids, ids))
    assert from_events.num_users == 4


@pytest.mark.parametrize("dense_max_items", [10_000, 0])
def test_cooccurrence_keeps_top_neighbours_only(dense_max_items):
    rng = np.random.default_rng(3)
    baskets = {f"u{u}": [f"i{j}" for j in rng.choice(60, size=8, replace=False)] for u in range(200)}
    ids = [f"i{j}" for j in range(60)]
    full = CooccurrenceModel.fit(baskets, ids, max_neighbors=None, dense_max_items=dense_max_items)
    top = CooccurrenceModel.fit(baskets, ids, max_neighbors=5, dense_max_items=dense_max_items)
    full_matrix, top_matrix = full.pair_similarities(ids, ids), top.pair_similarities(ids, ids)
    assert ((top_matrix > 0).sum(axis=1) <= 5).all()
    for row in range(60):
        kept = np.sort(top_matrix[row][top_matrix[row] > 0])[::-1]
        np.testing.assert_allclose(kept, np.sort(full_matrix[row])[::-1][: len(kept)], atol=1e-6)


def test_sparse_cooccurrence_keeps_the_lower_column_among_tied_neighbours():
    # Item "x" meets each of a0..a7 once with the same users: eight equal similarities. The top
    # three kept are the three lowest columns; every row's columns stay sorted.
    ids = ["x"] + [f"a{j}" for j in range(8)] + ["y"]
    baskets = {f"u{j}": ["x", f"a{j}"] for j in range(8)}
    baskets["v"] = ["x", "y"]
    baskets["w"] = ["x", "y"]
    model = CooccurrenceModel.fit(baskets, ids, max_neighbors=3, dense_max_items=0)
    matrix = model._sparse
    row = matrix.getrow(0)
    assert [ids[c] for c in row.indices] == ["a0", "a1", "y"]
    assert matrix.has_sorted_indices
    full = CooccurrenceModel.fit(baskets, ids, max_neighbors=None, dense_max_items=0)
    np.testing.assert_array_equal(model.pair_similarities(["x"], ["a0", "a1", "y"]),
                                  full.pair_similarities(["x"], ["a0", "a1", "y"]))


def test_sparse_cooccurrence_queries_give_scipys_exact_values():
    # scores and pair_similarities read the CSR arrays directly: the same float32 bits as
    # scipy's row slice, transpose and product; neighbour positions are neighbours' items.
    rng = np.random.default_rng(5)
    ids = [f"i{j}" for j in range(400)]
    baskets = {f"u{u}": [ids[int(j)] for j in rng.zipf(1.6, size=int(rng.integers(2, 30))) % 400] for u in range(600)}
    model = CooccurrenceModel.fit(baskets, ids, max_neighbors=40, dense_max_items=0)
    matrix = model._sparse
    for trial in range(60):
        history = [ids[int(j)] for j in rng.choice(120, size=int(rng.integers(1, 20)), replace=False)]
        weights = {h: float(rng.random()) * (trial % 3) for h in history}
        rows, row_weights = model._history_rows(weights)
        expected = (np.asarray(matrix[rows].T @ row_weights, dtype=np.float32).ravel() if len(rows)
                    else np.zeros(len(ids), dtype=np.float32))
        assert model.scores(weights).tobytes() == expected.tobytes()
        # At a few positions (repeated, unknown, in any order): the same bits as the full scores.
        positions = np.append(rng.choice(400, size=int(rng.integers(1, 150))), [-1, 3, 3])
        assert model.scores_at(weights, positions).tobytes() == np.where(positions >= 0, expected[positions], 0).tobytes()
        columns = [ids[int(j)] for j in rng.choice(400, size=12)] + history[:2] + ["unknown"]
        r, c = model.indices_of(history), model.indices_of(columns)
        block = np.zeros((len(r), len(c)), dtype=np.float32)
        known = np.flatnonzero(c >= 0)
        block[:, known] = matrix[r][:, c[known]].toarray()
        assert model.pair_similarities(history, columns).tobytes() == block.tobytes()
        n = int(rng.choice([3, 10, 100]))
        neighbours = {item for hits in model.neighbours(history, n).values() for item, _ in hits}
        assert model.neighbour_ids(history, n) == neighbours
        assert {ids[i] for i in model.neighbour_positions(history, n)} == neighbours


def test_sparse_cooccurrence_blocks_place_values_alike_by_map_and_by_search():
    # _sparse_block places each stored value among the wanted columns through a catalogue-sized
    # map or by binary search (by size): the same float32 bits as scipy's slice either way, with
    # every item known (the block returned as is) or not, repeated columns, and a matrix holding
    # duplicate entries (summed per cell, as toarray sums them).
    rng = np.random.default_rng(11)
    ids = [f"i{j}" for j in range(300)]
    baskets = {f"u{u}": [ids[int(j)] for j in rng.zipf(1.5, size=int(rng.integers(2, 25))) % 300] for u in range(500)}
    model = CooccurrenceModel.fit(baskets, ids, max_neighbors=30, dense_max_items=0)
    assert model._canonical
    fitted, data, indices, indptr = model._sparse, [], [], [0]
    for row in range(fitted.shape[0]):  # every third row's first value stored twice, halved the second time
        stored = slice(fitted.indptr[row], fitted.indptr[row + 1])
        values, columns = fitted.data[stored], fitted.indices[stored]
        data += values.tolist() + ([float(values[0]) * 0.5] if len(values) and row % 3 == 0 else [])
        indices += columns.tolist() + ([int(columns[0])] if len(values) and row % 3 == 0 else [])
        indptr.append(len(data))
    doubled = sp.csr_matrix((np.array(data, dtype=np.float32), np.array(indices), np.array(indptr)), shape=fitted.shape)
    duplicated = CooccurrenceModel(ids, doubled, model.num_users)
    assert not duplicated._canonical
    for trial in range(40):
        history = [ids[int(j)] for j in rng.choice(300, size=int(rng.integers(1, 60)), replace=False)]
        columns = [ids[int(j)] for j in rng.choice(300, size=int(rng.integers(1, 80)))]
        for m in (model, duplicated):
            r, c = m.indices_of(history), m.indices_of(columns)
            expected = m._sparse[r][:, c].toarray().astype(np.float32)
            for column_map in (True, False):
                assert m._sparse_block(r, c, column_map=column_map).tobytes() == expected.tobytes()
            assert m.pair_similarities(history, columns).tobytes() == expected.tobytes()
            with_unknown = m.pair_similarities(history + ["nope"], ["nope"] + columns)
            assert with_unknown.tobytes() == np.pad(expected, ((0, 1), (1, 0))).tobytes()


def test_dense_cooccurrence_scores_at_positions_are_the_full_scores_there():
    ids = [f"i{j}" for j in range(30)]
    rng = np.random.default_rng(9)
    baskets = {f"u{u}": [ids[int(j)] for j in rng.integers(0, 30, size=6)] for u in range(50)}
    model = CooccurrenceModel.fit(baskets, ids)
    weights = {ids[2]: 0.5, ids[7]: 1.5, "unknown": 2.0}
    positions = np.array([5, -1, 0, 29, 5])
    full = model.scores(weights)
    assert model.scores_at(weights, positions).tobytes() == np.where(positions >= 0, full[positions], 0).astype(np.float32).tobytes()
    assert model.scores_at({}, positions).tolist() == [0.0] * 5


def test_search_labels_are_the_items_search_returns():
    rng = np.random.default_rng(6)
    index = ItemIndex(16, initial_capacity=64)
    names = [f"x{j}" for j in range(300)]
    index.upsert(names, rng.normal(size=(300, 16)).astype(np.float32))
    index.delete(names[::7])
    for _ in range(20):
        vector = rng.normal(size=16).astype(np.float32)
        labels, generation = index.search_labels(vector, 25)
        assert generation == index.generation
        assert [index._id_of_label[l] for l in labels] == [i for i, _ in index.search(vector, 25)]


def test_cooccurrence_on_a_large_sparse_catalog_stays_small():
    rng = np.random.default_rng(4)
    n_items = 100_000
    baskets = {f"u{u}": [f"i{j}" for j in rng.integers(0, n_items, size=5)] for u in range(2000)}
    started = time.perf_counter()
    model = CooccurrenceModel.fit(baskets, [f"i{j}" for j in range(n_items)], max_neighbors=50)
    assert time.perf_counter() - started < 10
    assert model._dense is None and model._sparse.nnz <= 2000 * 5 * 4
    user_items = baskets["u0"]
    scores = model.scores({user_items[0]: 1.0})
    assert scores.shape == (n_items,) and scores.max() > 0


def test_plain_dict_catalog_changed_in_place_never_leaks_an_expired_item():
    items = make_items()
    ranker = make_ranker(items=items)
    plain = {i.item_id: i for i in items}
    ranker.catalog = plain
    cold = query(user_id=None, k=3, exhaustive=True)
    top = ranker.recommend(cold).items[0].item_id
    # Same length, so the cached columns look current; the returned items are re-checked.
    old = plain[top]
    plain[top] = Item(old.item_id, old.title, category=old.category, published_at=old.published_at, expires_at=NOW - 1)
    assert top not in {r.item_id for r in ranker.recommend(cold).items}


def test_catalog_version_callable_keys_the_cached_columns():
    items = make_items()
    ranker = make_ranker(items=items)
    plain = {i.item_id: i for i in items}
    version = [0]
    ranker.catalog, ranker.catalog_version = plain, lambda: version[0]
    ranker.recommend(query(user_id=None, exhaustive=True))
    plain.pop("space-00")
    plain["added"] = Item("added", "Added story", category="space", published_at=NOW)
    version[0] += 1
    scored = ranker.score_candidates(query(user_id=None, exhaustive=True))
    assert "added" in set(scored.item_ids) and "space-00" not in set(scored.item_ids)


def test_the_callers_deadline_bounds_the_short_term_encode():
    seen: list[float | None] = []
    topic = TopicEncoder()

    def encoder(texts, timeout=None):
        seen.append(timeout)
        return topic(texts)

    ranker = make_ranker(encoder=encoder)
    seen.clear()
    ranker.recommend(query(params=TimeModelParams(alpha=1.0), encode_timeout=0.25))
    assert seen == [0.25]  # the history text waited at most the caller's time left
    ranker.clear_cache()
    seen.clear()
    ranker.recommend(query(params=TimeModelParams(alpha=1.0)))
    assert seen == [None]
