"""EncoderService: text in, L2-normalised vectors out."""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np

from chronorec.server.config import Limits
from chronorec.server.core.encoder import EncodeDeadlineExceeded
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
        timeout = deadline_left(context)
        # Queueing in the micro-batcher never blocks, so it runs here; the wait for the vectors
        # then holds no thread, only this call's task.
        future, version = self.engine.submit_encode(texts)
        vectors = await _encoded(future, timeout, len(texts))
        if len(vectors) <= _BUILD_ON_LOOP:
            return _response(vectors, version)
        # ~0.1 ms of Python per vector (25 ms for 256): a large answer is built on a pool
        # thread, so the event loop keeps answering others meanwhile.
        return await self.work.compute.run(_response, vectors, version)


# Vectors an answer may hold to be built on the event loop (~1.5 ms), which saves the
# hand-off to a pool thread and back that most Encode calls, of a few texts, would pay.
_BUILD_ON_LOOP = 16


async def _encoded(future: concurrent.futures.Future, timeout: float | None, count: int) -> np.ndarray:
    """The Future's vectors, within the caller's deadline.

    Shielded, so that a caller who leaves does not cancel the Future on the event loop's thread:
    cancelling drops queued texts under the batcher's lock and may release a swapped-out model,
    which is work for a pool thread (asyncio's default executor here).
    """
    waiter = asyncio.wrap_future(future)
    # Nobody may be awaiting it when it fails after the caller left: mark its error as seen.
    waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        return await asyncio.wait_for(asyncio.shield(waiter), timeout)
    except asyncio.TimeoutError:
        _cancel_elsewhere(future)
        raise EncodeDeadlineExceeded(f"encoding {count} texts did not finish within {timeout:.3g} s") from None
    except asyncio.CancelledError:
        _cancel_elsewhere(future)
        raise


def _cancel_elsewhere(future: concurrent.futures.Future) -> None:
    asyncio.get_running_loop().run_in_executor(None, future.cancel)


def _response(vectors: np.ndarray, version: str) -> encoder_pb2.EncodeResponse:
    return encoder_pb2.EncodeResponse(
        embeddings=[encoder_pb2.Embedding(values=row.tolist()) for row in vectors],
        model_version=version,
        dimension=int(vectors.shape[1]),
    )
