"""RecommenderService: time-aware Recommend and idempotent Feedback."""

from __future__ import annotations

import time

from chronorec.server.config import Limits
from chronorec.server.core.engine import ChronorecEngine, Recommendations
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.core.ranking import RecommendQuery
from chronorec.server.service.convert import (
    check_id,
    event_from_proto,
    history_from_proto,
    optional_seconds,
    to_timestamp,
)
from chronorec.server.service.errors import deadline_left, ensure_active, rpc
from chronorec.server.service.executors import Executors
from chronorec.v1 import recommender_pb2, recommender_pb2_grpc

OVERRIDE_FIELDS = [f.name for f in recommender_pb2.TimeModelOverrides.DESCRIPTOR.fields]


class RecommenderServicer(recommender_pb2_grpc.RecommenderServiceServicer):
    def __init__(self, engine: ChronorecEngine, limits: Limits, executors: Executors):
        self.engine = engine
        self.limits = limits
        self.work = executors

    def _query(self, request) -> RecommendQuery:
        limits = self.limits
        if not (1 <= request.k <= limits.max_k):
            raise InvalidArgument(f"k must be between 1 and max_k={limits.max_k}, got {request.k}")
        if not request.user_id and not request.history:
            raise InvalidArgument("give a user_id or an inline history")
        check_id(request.user_id, "user_id", required=False)
        if len(request.history) > limits.max_history_events:
            raise InvalidArgument(
                f"{len(request.history)} history events exceed max_history_events={limits.max_history_events}"
            )
        if len(request.exclude_item_ids) > limits.max_exclude_items:
            raise InvalidArgument(
                f"{len(request.exclude_item_ids)} excluded ids exceed max_exclude_items={limits.max_exclude_items}"
            )
        if len(request.categories) > limits.max_categories:
            raise InvalidArgument(f"{len(request.categories)} categories exceed max_categories={limits.max_categories}")
        overrides = {
            name: getattr(request.overrides, name)
            for name in OVERRIDE_FIELDS
            if request.HasField("overrides") and request.overrides.HasField(name)
        }
        return RecommendQuery(
            user_id=request.user_id or None,
            k=request.k,
            at=optional_seconds(request, "at", "at"),
            inline_history=[history_from_proto(h, i) for i, h in enumerate(request.history)],
            exclude=frozenset(request.exclude_item_ids),
            categories=frozenset(c for c in request.categories if c),
            allow_repeats=request.allow_repeats,
            overrides=overrides,
        )

    @rpc
    async def Recommend(self, request, context):
        ensure_active(context)
        # The deadline bounds the wait for the encoder when the user's history text is not cached.
        return await self.work.compute.run(self._recommend, request, deadline_left(context))

    def _recommend(self, request, timeout: float | None) -> recommender_pb2.RecommendResponse:
        answer = self.engine.recommend(self._query(request), timeout=timeout)
        return _response(answer)

    def _store(self, request) -> tuple[int, int]:
        if len(request.events) > self.limits.max_feedback_batch:
            raise InvalidArgument(
                f"{len(request.events)} events exceed max_feedback_batch={self.limits.max_feedback_batch}; split the batch"
            )
        received_at = time.time()
        events = [event_from_proto(e, i, received_at) for i, e in enumerate(request.events)]
        return self.engine.feedback(events)

    @rpc
    async def Feedback(self, request, context):
        ensure_active(context)
        stored, duplicates = await self.work.store.run(self._store, request)
        return recommender_pb2.FeedbackResponse(stored=stored, duplicates=duplicates)

    @rpc
    async def FeedbackStream(self, request_iterator, context):
        stored = duplicates = 0
        # Each message is its own transaction: an interrupted stream leaves whole batches only,
        # and the response (the acknowledgement) comes after the last one is durable.
        async for request in request_iterator:
            ensure_active(context)
            new, dup = await self.work.store.run(self._store, request)
            stored += new
            duplicates += dup
        return recommender_pb2.FeedbackResponse(stored=stored, duplicates=duplicates)


def _response(answer: Recommendations) -> recommender_pb2.RecommendResponse:
    items = [
        recommender_pb2.ScoredItem(
            item_id=rec.item_id,
            title=rec.title,
            category=rec.category,
            score=rec.score,
            reasons=recommender_pb2.Reasons(
                semantic=rec.semantic,
                cooccurrence=rec.cooccurrence,
                freshness=rec.freshness,
                trend=rec.trend,
                history=[
                    recommender_pb2.HistoryContribution(item_id=h.item_id, title=h.title, contribution=h.contribution)
                    for h in rec.top_history
                ],
            ),
        )
        for rec in answer.result.items
    ]
    return recommender_pb2.RecommendResponse(
        items=items,
        model_version=answer.model_version,
        at=to_timestamp(answer.at),
        history_length=answer.result.history_length,
    )
