"""Popularity counts kept between queries equal a fresh count over the log, in any order of queries, late events and erasures."""

from __future__ import annotations

import random

import numpy as np
import pytest

from chronorec.server.core.catalog import Event
from chronorec.server.core.interactions import InteractionState

WINDOWS = (5.0, 30.0, 200.0)


def _reference(events: list[Event], items: list[str], at: float, window: float | None) -> list[int]:
    counts = dict.fromkeys(items, 0)
    for e in events:
        if e.timestamp <= at and (window is None or e.timestamp >= at - window):
            counts[e.item_id] += 1
    return [counts[i] for i in items]


def _reference_trending(events: list[Event], items: list[str], at: float, window: float, n: int) -> list[tuple[str, int]]:
    in_window = dict(zip(items, _reference(events, items, at, window)))
    total = dict(zip(items, _reference(events, items, at, None)))
    ranked = sorted((i for i in items if total[i] > 0), key=lambda i: (-in_window[i], -total[i], i))
    return [(i, in_window[i]) for i in ranked[:n]]


def _check(state: InteractionState, held: list[Event], items: list[str], at: float, window: float, n: int) -> None:
    assert state.trend_counts(at, window, items).tolist() == _reference(held, items, at, window)
    assert state.all_time_counts(at, items).tolist() == _reference(held, items, at, None)
    assert state.trending(at, window, n) == _reference_trending(held, items, at, window, n)
    ids = state.item_ids()
    assert state.trend_counts(at, window).tolist() == _reference(held, ids, at, window)


@pytest.mark.parametrize("seed", range(4))
def test_counts_match_the_log_through_late_events_erasures_and_any_query_order(seed):
    rng = random.Random(seed)
    items = [f"i{n:02d}" for n in range(25)]
    users = [f"u{n}" for n in range(8)]
    state, held, clock = InteractionState(), [], 0.0
    for step in range(60):
        action = rng.random()
        if action < 0.45:
            # A batch of events: mostly new times, some late (before events already held).
            batch = []
            for _ in range(rng.randrange(1, 12)):
                clock += rng.uniform(0, 3)
                late = rng.random() < 0.25
                stamp = float(round(rng.uniform(0, clock) if late else clock))
                batch.append(Event(f"e{seed}-{step}-{len(batch)}", rng.choice(users), rng.choice(items), "view", stamp))
            state.add(batch)
            held.extend(batch)
        elif action < 0.5 and held:
            victim = rng.choice(users)
            assert state.remove_user(victim) == sum(e.user_id == victim for e in held)
            held = [e for e in held if e.user_id != victim]
        # Queries moving forward, backward and staying put, over several windows.
        for _ in range(rng.randrange(1, 4)):
            at = rng.choice([clock, clock, rng.uniform(0, clock + 5), float(round(rng.uniform(0, clock)))])
            _check(state, held, items, at, rng.choice(WINDOWS), rng.randrange(0, 12))


def test_kept_counts_are_read_only_and_stay_as_they_were():
    state = InteractionState()
    state.add([Event("1", "u", "a", "view", 10.0), Event("2", "u", "b", "view", 20.0)])
    counts = state.trend_counts(20.0, 15.0)
    assert counts.tolist() == [1, 1]
    with pytest.raises(ValueError):
        counts[0] = 5
    # New events give new arrays; one handed out earlier keeps its values.
    state.add([Event("3", "v", "a", "view", 20.0), Event("4", "v", "c", "view", 19.0)])
    assert state.trend_counts(20.0, 15.0).tolist() == [2, 1, 1]
    assert counts.tolist() == [1, 1]
    assert state.trending_positions(20.0, 15.0, 2).tolist() == [0, 1]


def test_many_window_lengths_at_once_stay_exact():
    rng = np.random.default_rng(5)
    items = [f"i{n}" for n in range(40)]
    events = [Event(str(n), f"u{n % 7}", items[int(rng.integers(0, 40))], "view", float(rng.uniform(0, 500)))
              for n in range(800)]
    state = InteractionState()
    state.add(events)
    for at in rng.uniform(0, 520, 30):
        for window in (1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0, 89.0):  # more than the kept windows
            assert state.trend_counts(float(at), window, items).tolist() == _reference(events, items, float(at), window)
