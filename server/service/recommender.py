"""RecommenderService: time-aware Recommend (single and batched), SimilarItems, idempotent Feedback and user erasure."""

from __future__ import annotations

import math
import time

from chronorec.client import rules
from chronorec.server.config import Limits
from chronorec.server.core.catalog import Event, Impression
from chronorec.server.core.engine import ChronorecEngine, Recommendations, SimilarItems
from chronorec.server.core.errors import ChronorecError, InvalidArgument
from chronorec.server.core.online_metrics import RecommendationRef
from chronorec.server.core.ranking import RecommendQuery
from chronorec.server.core.similar import SimilarQuery, check_semantic_weight
from chronorec.server.security import caller_label
from chronorec.server.service.convert import (
    check_id,
    event_from_proto,
    history_from_proto,
    impression_from_proto,
    optional_seconds,
    position_from_proto,
    to_timestamp,
)
from chronorec.server.service.errors import deadline_left, ensure_active, rpc, status_for
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
        overrides = {}
        if request.HasField("overrides"):
            given = request.overrides
            overrides = {name: getattr(given, name) for name in OVERRIDE_FIELDS if given.HasField(name)}
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
        events: list[Event] = []
        impressions: list[Impression] = []
        sources: dict[str, RecommendationRef] = {}
        for i, message in enumerate(request.events):
            if message.action == rules.IMPRESSION_ACTION:
                impressions.append(impression_from_proto(message, i, received_at))
                continue
            event = event_from_proto(message, i, received_at)
            position = position_from_proto(message, f"event {i}")
            if message.recommendation_id:
                check_id(message.recommendation_id, f"event {i}: recommendation_id")
                # The first copy of an event id is the one stored.
                sources.setdefault(event.event_id, RecommendationRef(message.recommendation_id, position))
            events.append(event)
        return self.engine.feedback(events, impressions, sources)

    @rpc
    async def Feedback(self, request, context):
        ensure_active(context)
        stored, duplicates = await self.work.store.run(self._store, request)
        return recommender_pb2.FeedbackResponse(stored=stored, duplicates=duplicates)

    # ---- batch ------------------------------------------------------------------------

    @rpc
    async def RecommendBatch(self, request, context):
        ensure_active(context)
        count, limit = len(request.requests), self.limits.max_batch_users
        if not count:
            raise InvalidArgument("the batch holds no requests")
        if count > limit:
            raise InvalidArgument(f"{count} requests exceed max_batch_users={limit}; split the batch")
        return await self.work.compute.run(self._recommend_batch, request, deadline_left(context))

    def _recommend_batch(self, request, timeout: float | None) -> recommender_pb2.RecommendBatchResponse:
        queries: list[RecommendQuery | ChronorecError] = []
        for entry in request.requests:
            try:
                queries.append(self._query(entry))
            except ChronorecError as error:  # this entry alone fails
                queries.append(error)
        answers, encoded = self.engine.recommend_batch(queries, timeout)
        results = []
        for answer in answers:
            if isinstance(answer, Recommendations):
                results.append(recommender_pb2.RecommendBatchEntry(code=0, response=_response(answer)))
            else:
                code = status_for(answer)
                results.append(recommender_pb2.RecommendBatchEntry(code=code.value[0], message=answer.message))
        return recommender_pb2.RecommendBatchResponse(results=results, encoded_texts=encoded)

    # ---- similar items -------------------------------------------------------------------

    def _similar_query(self, request) -> SimilarQuery:
        limits = self.limits
        if not (1 <= request.k <= limits.max_k):
            raise InvalidArgument(f"k must be between 1 and max_k={limits.max_k}, got {request.k}")
        which = request.WhichOneof("query")
        if which is None:
            raise InvalidArgument("give an item_id or a text")
        item_id = check_id(request.item_id, "item_id") if which == "item_id" else None
        text = request.text if which == "text" else None
        if text is not None:
            if not text.strip():
                raise InvalidArgument("text is empty")
            if len(text) > limits.max_text_chars:
                raise InvalidArgument(f"text has {len(text)} characters, more than max_text_chars={limits.max_text_chars}")
        if len(request.exclude_item_ids) > limits.max_exclude_items:
            raise InvalidArgument(
                f"{len(request.exclude_item_ids)} excluded ids exceed max_exclude_items={limits.max_exclude_items}"
            )
        if len(request.categories) > limits.max_categories:
            raise InvalidArgument(f"{len(request.categories)} categories exceed max_categories={limits.max_categories}")
        weight = None
        if request.HasField("semantic_weight"):
            if not math.isfinite(request.semantic_weight):
                raise InvalidArgument("semantic_weight must be a finite number in [0, 1]")
            weight = check_semantic_weight(request.semantic_weight)
        return SimilarQuery(
            k=request.k,
            at=optional_seconds(request, "at", "at"),
            item_id=item_id,
            text=text,
            exclude=frozenset(request.exclude_item_ids),
            categories=frozenset(c for c in request.categories if c),
            semantic_weight=weight,
        )

    @rpc
    async def SimilarItems(self, request, context):
        ensure_active(context)
        query = self._similar_query(request)
        answer = await self.work.compute.run(self.engine.similar_items, query, deadline_left(context))
        return _similar_response(answer)

    # ---- erasure -------------------------------------------------------------------------

    @rpc
    async def DeleteUser(self, request, context):
        ensure_active(context)
        user_id = check_id(request.user_id, "user_id")
        events, impressions = await self.work.store.run(self.engine.delete_user, user_id, caller_label(context))
        return recommender_pb2.DeleteUserResponse(events_deleted=events, impressions_deleted=impressions)

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
    # Filled in place: a sub-message passed to a constructor is built and then copied, which made
    # this conversion cost twice as much (~250 µs against ~110 µs for k=10 with reasons). The
    # bytes are the same: `reasons` is set on every item, as the constructors did.
    response = recommender_pb2.RecommendResponse(
        model_version=answer.model_version,
        at=to_timestamp(answer.at),
        history_length=answer.result.history_length,
        recommendation_id=answer.recommendation_id,
    )
    add_item = response.items.add
    for rec in answer.result.items:
        item = add_item(item_id=rec.item_id, title=rec.title, category=rec.category, score=rec.score)
        reasons = item.reasons
        reasons.SetInParent()
        reasons.semantic = rec.semantic
        reasons.cooccurrence = rec.cooccurrence
        reasons.freshness = rec.freshness
        reasons.trend = rec.trend
        add = reasons.history.add
        for h in rec.top_history:
            add(item_id=h.item_id, title=h.title, contribution=h.contribution)
        add = reasons.features.add
        for f in rec.feature_reasons:
            add(name=f.name, contribution=f.contribution)
    return response


def _similar_response(answer: SimilarItems) -> recommender_pb2.SimilarItemsResponse:
    return recommender_pb2.SimilarItemsResponse(
        items=[
            recommender_pb2.SimilarItem(
                item_id=item.item_id,
                title=item.title,
                category=item.category,
                score=item.score,
                semantic=item.semantic,
                cooccurrence=item.cooccurrence,
            )
            for item in answer.items
        ],
        model_version=answer.model_version,
        at=to_timestamp(answer.at),
        semantic_weight=answer.semantic_weight,
    )
