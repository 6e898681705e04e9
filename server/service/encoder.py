"""EncoderService: text in, L2-normalised vectors out."""

from __future__ import annotations

from chronorec.server.config import Limits
from chronorec.server.core.engine import ChronorecEngine
from chronorec.server.core.errors import InvalidArgument
from chronorec.server.service.errors import deadline_left, ensure_active, rpc
from chronorec.server.service.executors import Executors
from chronorec.v1 import encoder_pb2, encoder_pb2_grpc


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, engine: ChronorecEngine, limits: Limits, executors: Executors):
        self.engine = engine
        self.limits = limits
        self.work = executors

    @rpc
    async def Encode(self, request, context):
        texts = list(request.texts)
        if not texts:
            raise InvalidArgument("texts is empty: send at least one text")
        if len(texts) > self.limits.max_texts_per_encode:
            raise InvalidArgument(
                f"{len(texts)} texts exceed max_texts_per_encode={self.limits.max_texts_per_encode}; split the batch"
            )
        for i, text in enumerate(texts):
            if len(text) > self.limits.max_text_chars:
                raise InvalidArgument(f"text {i} has {len(text)} characters, over max_text_chars={self.limits.max_text_chars}")
        ensure_active(context)
        # The deadline bounds the wait for the micro-batcher: texts not yet started are dropped.
        return await self.work.compute.run(self._encode, texts, deadline_left(context))

    def _encode(self, texts: list[str], timeout: float | None) -> encoder_pb2.EncodeResponse:
        vectors, version = self.engine.encode(texts, timeout=timeout)
        return encoder_pb2.EncodeResponse(
            embeddings=[encoder_pb2.Embedding(values=row.tolist()) for row in vectors],
            model_version=version,
            dimension=int(vectors.shape[1]),
        )
