"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging
from typing import Callable

import grpc

from chronorec.server.core.encoder import EncodeDeadlineExceeded
from chronorec.server.security import replace_behavior
from chronorec.server.core.errors import (
    ChronorecError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)

log = logging.getLogger("chronorec.rpc")

STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}

# Standard gRPC retry pushback (gRFC A6): clients with a retry policy wait this long before
# retrying; others can read it from the trailing metadata.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_PUSHBACK_MS = {grpc.StatusCode.UNAVAILABLE: 500, grpc.StatusCode.RESOURCE_EXHAUSTED: 200}


UNDECODABLE_MESSAGE = "the request is not a valid protobuf message of this RPC (malformed bytes or invalid UTF-8 in a string)"


class CallEnded(Exception):
    """The caller cancelled or its deadline passed: stop working on the call."""


def status_for(error: ChronorecError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def deadline_left(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline (None when it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else max(0.0, remaining)


def ensure_active(context: grpc.ServicerContext) -> None:
    """Raise CallEnded when nobody waits for the answer any more (checked between phases of work)."""
    if not context.is_active():
        raise CallEnded()


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    pushback = RETRY_PUSHBACK_MS.get(code)
    if pushback is not None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(pushback)),))
    context.abort(code, message)


def _ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    return grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED


def rpc(method):
    """Map domain errors to status codes; anything unexpected is INTERNAL with the detail logged."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except CallEnded:
            # Nobody reads this status; it only labels the call in metrics.
            context.abort(_ended_code(context), "the call ended before its work was done")
        except EncodeDeadlineExceeded as error:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, error.message)
        except ChronorecError as error:
            _abort(context, status_for(error), error.message)
        except Exception:
            if not context.is_active():
                # A cancelled stream raises from its request iterator: the caller left, no bug here.
                context.abort(_ended_code(context), "the call ended before its work was done")
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""


class MalformedRequest(InvalidArgument):
    """A message of a request stream did not parse."""


def _parse_or_mark(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def tolerant(data: bytes):
        try:
            return parse(data)
        except Exception:
            return _Undecodable()

    return tolerant


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Answers INVALID_ARGUMENT to bytes that are not the RPC's request message.

    gRPC itself answers INTERNAL ("Exception deserializing request!"), which blames the server
    for a client's bug; any client but Python's can send such bytes (e.g. invalid UTF-8).
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        tolerant = _parse_or_mark(handler.request_deserializer)

        def checked(requests):
            for request in requests:
                if isinstance(request, _Undecodable):
                    raise MalformedRequest(UNDECODABLE_MESSAGE)
                yield request

        if handler.request_streaming and handler.response_streaming:

            def guarded(requests, context):
                try:
                    yield from behavior(checked(requests), context)
                except MalformedRequest as error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

        elif handler.request_streaming:

            def guarded(requests, context):
                try:
                    return behavior(checked(requests), context)
                except MalformedRequest as error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

        elif handler.response_streaming:

            def guarded(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
                yield from behavior(request, context)

        else:

            def guarded(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
                return behavior(request, context)

        return replace_behavior(handler, guarded, request_deserializer=tolerant)
