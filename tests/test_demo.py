"""Synthetic drift dataset and demo catalog: determinism, time layout and interest drift."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from chronorec.server.core.demo import (
    DAY, DEMO_WINDOW_DAYS, TOPICS, ensure_demo, generate_demo, generate_drift_dataset, today_utc_midnight,
)
from chronorec.server.core.store import EventStore, event_problem, item_problem

ANCHOR = 1_767_225_600.0  # 2026-01-01 00:00 UTC


@pytest.fixture(scope="module")
def data():
    return generate_drift_dataset(seed=7, anchor=ANCHOR)


def test_same_arguments_same_output():
    assert generate_demo(seed=3, anchor=ANCHOR) == generate_demo(seed=3, anchor=ANCHOR)
    assert generate_drift_dataset(seed=3, n_items=80, n_users=9, n_events_per_user=12, anchor=ANCHOR) == \
        generate_drift_dataset(seed=3, n_items=80, n_users=9, n_events_per_user=12, anchor=ANCHOR)
    assert generate_demo(seed=3, anchor=ANCHOR) != generate_demo(seed=4, anchor=ANCHOR)


def test_default_anchor_is_today_midnight_utc():
    anchor = today_utc_midnight()
    assert anchor % DAY == 0
    data = generate_drift_dataset(n_items=24, n_users=2, n_events_per_user=5)
    assert data.anchor == anchor


def test_catalog_shape(data):
    items = data.items
    assert len(items) == 360 and len({it.item_id for it in items}) == 360
    assert len({it.title for it in items}) == 360
    assert Counter(it.category for it in items) == {t: 45 for t in TOPICS}
    assert all(item_problem(it) is None for it in items)
    start = ANCHOR - DEMO_WINDOW_DAYS * DAY
    published = [it.published_at for it in items if it.published_at is not None]
    past = [t for t in published if t <= ANCHOR]
    assert all(start <= t for t in past)
    assert 1 <= len(published) - len(past) <= 30  # a few not yet published
    assert max(past) - min(past) > 0.9 * DEMO_WINDOW_DAYS * DAY  # spread over the window
    expiries = [it.expires_at for it in items if it.expires_at is not None]
    assert any(t <= ANCHOR for t in expiries) and any(t > ANCHOR for t in expiries)


def test_events_are_valid_and_available(data):
    by_id = {it.item_id: it for it in data.items}
    start = ANCHOR - DEMO_WINDOW_DAYS * DAY
    assert len(data.events) > 1500 and len({e.event_id for e in data.events}) == len(data.events)
    assert [e.timestamp for e in data.events] == sorted(e.timestamp for e in data.events)
    pairs = Counter((e.user_id, e.item_id) for e in data.events)
    assert max(pairs.values()) == 1  # targets are always new to the user
    for e in data.events:
        assert event_problem(e) is None
        assert start <= e.timestamp < ANCHOR
        assert by_id[e.item_id].available_at(e.timestamp)
    assert {e.action for e in data.events} >= {"view", "click", "like", "rating", "skip"}
    assert all(e.value is not None for e in data.events if e.action == "rating")


def test_interest_drifts_from_topic_a_to_b(data):
    by_id = {it.item_id: it for it in data.items}
    on_topic = Counter()
    for u in data.users:
        assert u.topic_before != u.topic_after
        assert data.window_start < u.switch_at < ANCHOR
        before = Counter(by_id[e.item_id].category for e in data.events
                         if e.user_id == u.user_id and e.timestamp < u.switch_at)
        after = Counter(by_id[e.item_id].category for e in data.events
                        if e.user_id == u.user_id and e.timestamp >= u.switch_at)
        if sum(before.values()) >= 5:
            assert before.most_common(1)[0][0] == u.topic_before
        if sum(after.values()) >= 5:
            assert after.most_common(1)[0][0] == u.topic_after
    for e in data.events:
        u = next(x for x in data.users if x.user_id == e.user_id)
        on_topic[by_id[e.item_id].category == u.topic_at(e.timestamp)] += 1
    assert on_topic[True] / sum(on_topic.values()) > 0.8


def test_popularity_is_skewed(data):
    counts = sorted(Counter(e.item_id for e in data.events).values(), reverse=True)
    top_decile = sum(counts[: len(data.items) // 10])
    assert top_decile > 0.2 * len(data.events)


def test_sizes_scale():
    small = generate_drift_dataset(seed=1, n_items=40, n_users=5, n_events_per_user=6, anchor=ANCHOR,
                                   topics=("jazz", "finance"))
    assert len(small.items) == 40 and len(small.users) == 5
    assert {it.category for it in small.items} == {"jazz", "finance"}
    big = generate_drift_dataset(seed=1, n_items=1200, n_users=10, n_events_per_user=5, anchor=ANCHOR)
    assert len({it.title for it in big.items}) == 1200  # repeats get a part number
    with pytest.raises(ValueError):
        generate_drift_dataset(topics=("knitting", "jazz"), anchor=ANCHOR)


def test_ensure_demo_loads_once(tmp_path: Path):
    with EventStore(tmp_path / "e.db") as store:
        assert ensure_demo(store, anchor=ANCHOR) is True
        items, events = generate_demo(anchor=ANCHOR)
        assert store.count_items() == len(items) and store.count_events() == len(events)
        assert ensure_demo(store, anchor=ANCHOR) is False
        assert store.count_events() == len(events)
        user = events[-1].user_id
        assert store.events_for_user(user, until=ANCHOR)[-1] == [e for e in events if e.user_id == user][-1]
