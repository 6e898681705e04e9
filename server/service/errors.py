"""The one place where domain errors become gRPC status codes (with the retry pushback trailer)."""

from __future__ import annotations

import functools
import logging

import grpc

from chronorec.server.core.encoder import EncodeDeadlineExceeded
from chronorec.server.core.errors import (
    ChronorecError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)

log = logging.getLogger("chronorec.rpc")

# Looked up along the exception's class hierarchy, most specific first.
STATUS_OF = {
    EncodeDeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
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


class CallEnded(Exception):
    """The caller cancelled or its deadline passed: stop working on the call."""


def status_for(error: ChronorecError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def pushback_trailer(code: grpc.StatusCode) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a status with `code` carries: the pushback for retryable codes."""
    pushback = RETRY_PUSHBACK_MS.get(code)
    return ((RETRY_PUSHBACK_KEY, str(pushback)),) if pushback is not None else ()


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with `code` and `message`; UNAVAILABLE and RESOURCE_EXHAUSTED carry the pushback."""
    await context.abort(code, message, trailing_metadata=pushback_trailer(code))


async def abort_for(context: grpc.aio.ServicerContext, error: ChronorecError) -> None:
    """End the call with the status of a domain error."""
    await abort(context, status_for(error), error.message)


def deadline_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline (None when it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else max(0.0, remaining)


def ensure_active(context: grpc.aio.ServicerContext) -> None:
    """Raise CallEnded when nobody waits for the answer any more.

    Checked before work is handed to a thread: once it is there, a caller who leaves cancels
    the call's task, and work still queued is dropped with it.
    """
    if context.cancelled() or context.done() or deadline_left(context) == 0.0:
        raise CallEnded()


def _ended_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    return grpc.StatusCode.DEADLINE_EXCEEDED if deadline_left(context) == 0.0 else grpc.StatusCode.CANCELLED


def rpc(method):
    """Map domain errors to status codes; anything unexpected is INTERNAL with the detail logged.

    The core raises domain errors only (the store turns SQLite's storage failures into
    Unavailable itself), so no library's exception types are known here.

    A caller who leaves cancels the call's task: asyncio.CancelledError is a BaseException and
    passes through untouched, as it must.
    """

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the call already has its status
        except CallEnded:
            # Nobody reads this status; it only labels the call in metrics.
            await context.abort(_ended_code(context), "the call ended before its work was done")
        except ChronorecError as error:
            await abort_for(context, error)
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper
