"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import functools
import logging
import sqlite3

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

STATUS_OF = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: ChronorecError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def deadline_left(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline (None when it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else max(0.0, remaining)


def rpc(method):
    """Map domain errors to status codes; anything unexpected is INTERNAL with the detail logged."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except EncodeDeadlineExceeded as error:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, error.message)
        except ChronorecError as error:
            context.abort(status_for(error), error.message)
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                context.abort(grpc.StatusCode.UNAVAILABLE, "the event store is busy; retry in a moment")
            log.exception("database error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        except Exception:
            log.exception("unexpected error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper
