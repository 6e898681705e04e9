"""The Recommend response filled in place equals the one built from nested constructors, byte for byte."""

from __future__ import annotations

import pytest

from chronorec.server.core.engine import Recommendations
from chronorec.server.core.learned_ranker import FeatureReason
from chronorec.server.core.ranking import HistoryReason, Recommendation, RecommendResult
from chronorec.server.service.convert import to_timestamp
from chronorec.server.service.recommender import _response
from chronorec.v1 import recommender_pb2


def _by_constructors(answer: Recommendations) -> recommender_pb2.RecommendResponse:
    """The form the servicer used before: every sub-message built, then passed in."""
    return recommender_pb2.RecommendResponse(
        items=[
            recommender_pb2.ScoredItem(
                item_id=rec.item_id, title=rec.title, category=rec.category, score=rec.score,
                reasons=recommender_pb2.Reasons(
                    semantic=rec.semantic, cooccurrence=rec.cooccurrence, freshness=rec.freshness, trend=rec.trend,
                    history=[recommender_pb2.HistoryContribution(item_id=h.item_id, title=h.title, contribution=h.contribution)
                             for h in rec.top_history],
                    features=[recommender_pb2.FeatureContribution(name=f.name, contribution=f.contribution)
                              for f in rec.feature_reasons],
                ),
            )
            for rec in answer.result.items
        ],
        model_version=answer.model_version, at=to_timestamp(answer.at),
        history_length=answer.result.history_length, recommendation_id=answer.recommendation_id,
    )


def _answer(history: int, features: int, zeros: bool) -> Recommendations:
    value = 0.0 if zeros else 0.25
    items = [
        Recommendation(item_id=f"i{i}", title="" if zeros else f"title {i}", category="" if zeros else "jazz",
                       score=value * i, semantic=value, cooccurrence=value / 2, freshness=value / 3, trend=value / 4,
                       top_history=[HistoryReason(f"h{j}", f"history {j}", 0.1 * (j + 1)) for j in range(history)],
                       feature_reasons=[FeatureReason(f"feature_{j}", -0.2 * j) for j in range(features)])
        for i in range(10)
    ]
    return Recommendations(RecommendResult(items, history, True), "v-1", 1_790_000_000.125, "" if zeros else "v-1.n.m")


@pytest.mark.parametrize("history,features,zeros", [(3, 0, False), (0, 0, True), (3, 4, False), (0, 2, True)])
def test_response_equals_the_constructor_form(history, features, zeros):
    answer = _answer(history, features, zeros)
    fast, reference = _response(answer), _by_constructors(answer)
    assert fast == reference
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
    # Every item carries its reasons, even all-zero ones, as before.
    assert all(item.HasField("reasons") for item in fast.items)
