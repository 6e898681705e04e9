"""The co-occurrence model's session embedding and the learned ranker's topic features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chronorec.server.core.catalog import Event
from chronorec.server.core.cooccurrence import (
    _SVD_DENSE_BELOW, SESSION_DIMENSIONS, SESSION_GAP_S, SESSION_MIN_SESSIONS, SESSION_MIN_SHARE, CooccurrenceModel,
    _session_numbers,
)
from chronorec.server.core.features import FEATURE_INDEX, FeatureInputs, FirstStage, candidate_features
from chronorec.server.core.index import ItemIndex
from chronorec.server.core.interactions import InteractionState
from chronorec.server.core.manifest import TimeModelParams

# As many topics as the embedding has dimensions, five items each.
TOPICS = {f"t{k}": [f"t{k}-{j}" for j in range(5)] for k in range(SESSION_DIMENSIONS)}
T0 = 1_000_000.0


def topical_log(seed: int = 0, users: int = 300, topics: dict[str, list[str]] = TOPICS,
                per_session: int = 3) -> list[Event]:
    """Each session keeps to one topic (three of its five items), and each user has eight sessions
    on topics drawn at random: the users' histories mix topics, their sessions do not. Items t0-0
    and t0-1 never share a session, though many histories hold both."""
    rng = np.random.default_rng(seed)
    events, n = [], 0
    for u in range(users):
        at = T0 + u
        for topic in rng.choice(list(topics), 8):
            pool = topics[topic]
            if topic == "t0":
                pool = [i for i in pool if i != ("t0-1" if rng.random() < 0.5 else "t0-0")]
            for item in rng.choice(pool, per_session, replace=False):
                events.append(Event(f"e{n}", f"u{u}", str(item), "view", at))
                n += 1
                at += 60.0
            at += 2 * SESSION_GAP_S
    return events


def fitted(events: list[Event], extra_items: tuple[str, ...] = (),
           topics: dict[str, list[str]] = TOPICS) -> CooccurrenceModel:
    state = InteractionState()
    state.add(events)
    items, times = state.user_items_and_times()
    catalogue = [i for topic in topics.values() for i in topic] + list(extra_items)
    return CooccurrenceModel.fit(items, catalogue, times=times)


def test_items_that_share_sessions_topics_are_close_even_when_they_never_met():
    model = fitted(topical_log(), extra_items=("never-seen",))
    items = [i for topic in TOPICS.values() for i in topic]
    vectors, present = model.session_vectors_for([*items, "never-seen", "not-in-catalogue"])
    n = len(items)
    assert vectors.shape == (n + 2, SESSION_DIMENSIONS) and vectors.dtype == np.float32
    assert present.tolist() == [True] * n + [False, False]
    assert not vectors[n:].any()
    np.testing.assert_allclose(np.linalg.norm(vectors[:n], axis=1), 1.0, rtol=1e-5)
    # One dimension a topic: items of a topic point one way, other topics' items are orthogonal.
    topic = np.repeat(np.arange(len(TOPICS)), 5)
    cosine = vectors[:n] @ vectors[:n].T
    same = topic[:, None] == topic[None, :]
    assert cosine[same].min() > 0.99 and np.abs(cosine[~same]).max() < 0.01
    # t0-0 and t0-1 shared no session, yet histories hold both: co-occurrence sees them only as
    # often as any pair of items a user met, the embedding as one topic.
    assert 0 < model.pair_similarities(["t0-0"], ["t0-1"])[0, 0] < model.pair_similarities(["t0-0"], ["t0-2"])[0, 0]


def test_the_session_embedding_is_the_same_for_the_same_events_and_absent_without_times():
    events = topical_log(seed=1)
    first, second = fitted(events), fitted(events)
    np.testing.assert_array_equal(first.session_vectors, second.session_vectors)
    state = InteractionState()
    state.add(events)
    assert CooccurrenceModel.fit(state.user_items(), [i for t in TOPICS.values() for i in t]).session_vectors is None
    assert CooccurrenceModel.fit(state.user_items(), ["t0-0"]).session_vectors_for(["t0-0"]) is None


def test_times_must_match_the_items():
    with pytest.raises(ValueError, match="2 items but 1 times"):
        CooccurrenceModel.fit({"u": ["x", "y"]}, ["x", "y"], times={"u": [T0]})
    with pytest.raises(TypeError):
        CooccurrenceModel.fit([Event("e", "u", "x", "view", T0)], ["x"], times={"u": [T0]})


def test_sessions_break_after_the_session_gap():
    # One user: x then y within the gap (one session), z after it (another); a second user's own.
    state = InteractionState()
    state.add([Event("1", "u", "x", "view", T0), Event("2", "u", "y", "view", T0 + SESSION_GAP_S),
               Event("3", "u", "z", "view", T0 + 2 * SESSION_GAP_S + 1), Event("4", "v", "x", "view", T0)])
    items, times = state.user_items_and_times()
    assert items == {"u": ["x", "y", "z"], "v": ["x"]}
    assert times == {"u": [T0, T0 + SESSION_GAP_S, T0 + 2 * SESSION_GAP_S + 1], "v": [T0]}
    assert _session_numbers(items, times) == [0, 0, 1, 2]


def test_no_embedding_where_sessions_do_not_say_which_items_go_together():
    rng = np.random.default_rng(2)
    catalogue = [i for topic in TOPICS.values() for i in topic]
    # A ratings log of single visits, days apart: next to no session holds two items.
    visits = [Event(f"e{k}", f"u{k % 400}", str(rng.choice(catalogue)), "view", T0 + k * 86400.0 / 7)
              for k in range(4000)]
    state = InteractionState()
    state.add(visits)
    items, times = state.user_items_and_times()
    model = CooccurrenceModel.fit(items, catalogue, times=times)
    assert model.session_vectors is None and model.session_vectors_for(catalogue) is None
    # Sessions of several items, but fewer than the embedding's minimum.
    few = topical_log(users=SESSION_MIN_SESSIONS // 8 - 1)
    state = InteractionState()
    state.add(few)
    assert max(_session_numbers(*state.user_items_and_times())) + 1 < SESSION_MIN_SESSIONS
    assert fitted(few).session_vectors is None
    # Enough of them, drowned in single visits: under SESSION_MIN_SHARE of the sessions' items.
    enough = topical_log()
    lonely = [Event(f"x{k}", f"w{k}", "t1-1", "view", T0 + k) for k in range(int(len(enough) / SESSION_MIN_SHARE))]
    assert fitted(enough).session_vectors is not None
    assert fitted(enough + lonely).session_vectors is None


def topic_features(model: CooccurrenceModel, history_events: list[Event], at: float, ids: list[str]) -> np.ndarray:
    state = InteractionState()
    state.add(history_events)
    index = ItemIndex(4)
    catalogue = sorted({e.item_id for e in history_events} | set(ids))
    index.build(catalogue, np.eye(4, dtype=np.float32)[np.arange(len(catalogue)) % 4])
    inputs = FeatureInputs(at=at, history=state.history("me", at), params=TimeModelParams(), index=index, state=state,
                           cooccurrence=model, short_term=None, category_of=lambda _i: "")
    n = len(ids)
    first = FirstStage(item_ids=np.array(ids, dtype=object), category=np.array([""] * n, dtype=object),
                       published_at=np.full(n, np.nan), score=np.zeros(n), rank=np.arange(n, dtype=float),
                       semantic=np.zeros(n), cooccurrence=np.zeros(n), trend=np.zeros(n), freshness=np.zeros(n))
    return candidate_features(inputs, first)


def test_topic_features_read_the_current_session_and_the_whole_history():
    model = fitted(topical_log())
    # A session on topic t0 now; topic t1 a day ago.
    now = T0 + 10 * 86400
    history = [Event("h1", "me", "t1-3", "view", now - 86400), Event("h2", "me", "t1-4", "view", now - 86400 + 60),
               Event("h3", "me", "t0-2", "view", now - 120), Event("h4", "me", "t0-3", "view", now - 60)]
    ids = ["t0-4", "t1-0", "t2-0", "unknown"]
    x = topic_features(model, history, now, ids)
    session, whole = x[:, FEATURE_INDEX["topic_session"]], x[:, FEATURE_INDEX["topic_all"]]
    vectors, _ = model.session_vectors_for(ids)
    h = model.session_vectors_for(["t0-3", "t0-2", "t1-4", "t1-3"])[0]
    expected_now = (h[0] + h[1]) / np.linalg.norm(h[0] + h[1])
    expected_all = h.sum(axis=0) / np.linalg.norm(h.sum(axis=0))
    np.testing.assert_allclose(session[:3], vectors[:3] @ expected_now, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole[:3], vectors[:3] @ expected_all, rtol=1e-5, atol=1e-6)
    assert session[0] > 0.99 and abs(session[1]) < 0.01 and abs(session[2]) < 0.01
    assert whole[0] == pytest.approx(whole[1], abs=1e-3) and whole[0] > 0.7 and abs(whole[2]) < 0.01
    assert math.isnan(session[3]) and math.isnan(whole[3])  # not in the model
    # After a break longer than a session's gap there is no current session.
    later = topic_features(model, history, now - 60 + SESSION_GAP_S + 1, ids)
    assert np.isnan(later[:, FEATURE_INDEX["topic_session"]]).all()
    np.testing.assert_allclose(later[:3, FEATURE_INDEX["topic_all"]], whole[:3], rtol=1e-6)
    # A model fitted without times has no embedding: both features are missing.
    state = InteractionState()
    state.add(topical_log())
    plain = CooccurrenceModel.fit(state.user_items(), [i for t in TOPICS.values() for i in t])
    y = topic_features(plain, history, now, ids)
    assert np.isnan(y[:, FEATURE_INDEX["topic_session"]]).all() and np.isnan(y[:, FEATURE_INDEX["topic_all"]]).all()


def test_a_catalogue_of_few_items_is_decomposed_whole():
    # One topic per dimension, three items each: 72 items, at most _SVD_DENSE_BELOW.
    topics = {f"q{k}": [f"q{k}-{j}" for j in range(3)] for k in range(SESSION_DIMENSIONS)}
    catalogue = [i for topic in topics.values() for i in topic]
    assert len(catalogue) <= _SVD_DENSE_BELOW
    model = fitted(topical_log(topics=topics, per_session=2), topics=topics)
    v = model.session_vectors
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    topic = np.repeat(np.arange(SESSION_DIMENSIONS), 3)
    cosine = v @ v.T
    same = topic[:, None] == topic[None, :]
    assert cosine[same].min() > 0.99 and np.abs(cosine[~same]).max() < 0.01
