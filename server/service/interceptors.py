"""Server interceptors of the asyncio server: admission (stream bounds, idle timeouts, concurrency) and malformed requests."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import sys
from collections import Counter
from typing import AsyncIterator, Callable

import grpc

from chronorec.server.config import Limits, flag_name
from chronorec.server.core.errors import ChronorecError, InvalidArgument, Overloaded, Unavailable
from chronorec.server.service.errors import abort, abort_for

log = logging.getLogger("chronorec.admission")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION_PREFIX = "/grpc.reflection."

UNDECODABLE_MESSAGE = "the request is not a valid protobuf message of this RPC (malformed bytes or invalid UTF-8 in a string)"


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def replace_behavior(
    handler: grpc.RpcMethodHandler,
    behavior: Callable,
    *,
    request_deserializer: Callable | None = None,
    request_streaming: bool | None = None,
) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s serializers and response kind that runs `behavior`.

    `request_streaming=True` turns a unary request into a stream of requests: the behavior then
    starts when the call's headers arrive instead of after its request message. On the wire a
    unary call and a stream of one message are the same, so clients see no difference.
    """
    streaming_in = handler.request_streaming if request_streaming is None else request_streaming
    if streaming_in and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif streaming_in:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def run_behavior(behavior: Callable, request, context: grpc.aio.ServicerContext):
    """Run a servicer behavior to its end: a unary answer is returned, streamed answers are
    written to the call as they come (async generators) or by the behavior itself (context.write)."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
        return None
    return await result


class HandlerCache:
    """Wrapped handlers by the handler they wrap.

    gRPC asks the interceptors for a call's handler on every call; the handlers they are given
    are the same objects call after call (the servicers' own, or an inner interceptor's cached
    ones), so each wrapping (closures and a new RpcMethodHandler) is built once per method
    instead of once per call. Entries hold the handler they key, so an id is never reused
    while its entry lives; a wrapper made per call (authentication's) only fills the cache up
    to `limit`, which then starts over.
    """

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler], object], limit: int = 1024):
        self._wrap = wrap
        self._limit = limit
        self._entries: dict[int, tuple[grpc.RpcMethodHandler, object]] = {}

    def get(self, handler: grpc.RpcMethodHandler):
        entry = self._entries.get(id(handler))
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = self._wrap(handler)
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[id(handler)] = (handler, wrapped)
        return wrapped


def reject(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers `code` as soon as the call's headers arrive, without reading its request."""

    async def refuse(_requests, context):
        await abort(context, code, message)

    return replace_behavior(handler, refuse, request_streaming=True)


class CallKind(enum.Enum):
    """What a call is, for the bounds: each kind has its own total, so no kind can crowd out another."""

    SERVICE = "calls"
    HEALTH_CHECK = "Health/Check calls"
    HEALTH_WATCH = "Health/Watch streams"
    REFLECTION = "reflection streams"

    @property
    def per_connection(self) -> bool:
        """Whether the kind counts toward --max-streams-per-connection (all but health)."""
        return self not in (CallKind.HEALTH_CHECK, CallKind.HEALTH_WATCH)

    @classmethod
    def of(cls, method: str) -> "CallKind":
        if method == HEALTH_WATCH:
            return cls.HEALTH_WATCH
        if method.startswith(HEALTH_PREFIX):
            return cls.HEALTH_CHECK
        if method.startswith(REFLECTION_PREFIX):
            return cls.REFLECTION
        return cls.SERVICE


# The total bound (a Limits field) of each kind; a Health/Check is answered at once and has none.
_TOTAL_LIMIT = {
    CallKind.SERVICE: "max_streams",
    CallKind.HEALTH_WATCH: "max_health_watches",
    CallKind.REFLECTION: "max_reflection_streams",
}


class StreamIdle(Unavailable):
    """The client sent no request message within the stream idle timeout."""


class MissingRequest(InvalidArgument):
    """A unary call's request stream ended without its one message."""


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Admits each call when its headers arrive, and bounds what calls can hold.

    - Open calls (headers received, status not sent, idle or not) are bounded per connection
      and in total per kind; a call over a bound is refused at once. Health calls are left out
      of the per-connection count, so a client's busy connection never fails its own health
      checks (gRPC's client-side health checking watches each connection it uses); the
      transport's HTTP/2 stream limit bounds them per connection instead (app.channel_options).
    - Waiting for a request message, a unary call's body or a stream's next message, lasts at
      most the stream idle timeout; then the call ends UNAVAILABLE. An established
      Health/Watch waits only on the server, so the timeout never ends it.
    - Calls of the chronorec services being worked on (a request received and not yet
      answered) are bounded by max_concurrent_rpcs; health and reflection do their little
      work on the event loop and are not counted, so no load can refuse them.

    Every refusal is RESOURCE_EXHAUSTED with the pushback trailer and names its flag. Counters
    live on the event loop's thread only, so they need no lock.
    """

    def __init__(self, limits: Limits, stream_idle_timeout_s: float):
        self.limits = limits
        self.idle_timeout_s = stream_idle_timeout_s
        self._idle_flag = f"{flag_name('stream_idle_timeout')}={stream_idle_timeout_s:g}"
        self.open_by_connection: Counter[str] = Counter()
        self.open_by_kind: Counter[CallKind] = Counter()
        self.working = 0
        self._admitting: dict[str, HandlerCache] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        cache = self._admitting.get(method)
        if cache is None:
            kind = CallKind.of(method)
            cache = self._admitting[method] = HandlerCache(lambda handler: self._admitting_handler(handler, kind))
        return cache.get(handler)

    def _admitting_handler(self, handler: grpc.RpcMethodHandler, kind: CallKind) -> grpc.RpcMethodHandler:
        inner = behavior_of(handler)
        request_streaming = handler.request_streaming

        async def admitted(requests, context):
            peer = context.peer()
            try:
                self._open(peer, kind)
            except Overloaded as error:
                await abort_for(context, error)
            gated = _GatedRequests(self, requests, kind)
            try:
                if request_streaming:
                    return await run_behavior(inner, gated, context)
                return await run_behavior(inner, await gated.only(), context)
            except ChronorecError as error:
                # Raised by the gated requests inside a behavior that maps no errors itself
                # (reflection); chronorec servicers map them through service.errors already.
                await abort_for(context, error)
            finally:
                gated.close()
                self._close(peer, kind)

        return replace_behavior(handler, admitted, request_streaming=True)

    # ---- open calls -----------------------------------------------------------------
    def _open(self, peer: str, kind: CallKind) -> None:
        limits = self.limits
        on_connection = self.open_by_connection[peer]
        if kind.per_connection and on_connection >= limits.max_streams_per_connection:
            raise Overloaded(
                f"this connection has {on_connection} calls open, the most one connection may have; "
                f"retry later ({limits.flag('max_streams_per_connection')})"
            )
        limit = _TOTAL_LIMIT.get(kind)
        if limit is not None and self.open_by_kind[kind] >= getattr(limits, limit):
            raise Overloaded(
                f"the server has {self.open_by_kind[kind]} {kind.value} open, the most it takes; "
                f"retry later ({limits.flag(limit)})"
            )
        if kind.per_connection:
            self.open_by_connection[peer] += 1
        self.open_by_kind[kind] += 1

    def _close(self, peer: str, kind: CallKind) -> None:
        self.open_by_kind[kind] -= 1
        if kind.per_connection:
            self.open_by_connection[peer] -= 1
            if not self.open_by_connection[peer]:
                del self.open_by_connection[peer]

    # ---- work in progress -------------------------------------------------------------
    def take_work(self) -> None:
        if self.working >= self.limits.max_concurrent_rpcs:
            raise Overloaded(
                f"the server is working on {self.working} calls, the most it takes at once; "
                f"retry later ({self.limits.flag('max_concurrent_rpcs')})"
            )
        self.working += 1

    def release_work(self) -> None:
        self.working -= 1

    def idle_error(self) -> StreamIdle:
        return StreamIdle(
            f"no request message came for {self.idle_timeout_s:g} s, so the call was closed; "
            f"open a new one when there is something to send ({self._idle_flag})"
        )


if sys.version_info >= (3, 11):

    async def _within(awaitable, seconds: float):
        # A timer on the running task: asyncio.wait_for wraps every message read in a task of
        # its own, ~70 µs against ~17 µs here (Python 3.11), on every call the server takes.
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


class _GatedRequests:
    """A call's request messages, each awaited for at most the idle timeout.

    A chronorec service call holds a unit of work from the moment a message arrives until
    its handler asks for the next one (or ends): that is the time it is being worked on.
    """

    def __init__(self, admission: AdmissionInterceptor, requests: AsyncIterator, kind: CallKind):
        self._admission = admission
        self._requests = requests.__aiter__()
        self._counts_work = kind is CallKind.SERVICE
        self._holds_work = False

    def __aiter__(self) -> "_GatedRequests":
        return self

    async def __anext__(self):
        self.close()
        try:
            message = await _within(self._requests.__anext__(), self._admission.idle_timeout_s)
        except asyncio.TimeoutError:
            raise self._admission.idle_error() from None
        if self._counts_work:
            self._admission.take_work()
            self._holds_work = True
        return message

    async def only(self):
        """The one message of a unary call."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise MissingRequest("the call ended without its request message") from None

    def close(self) -> None:
        """Give back the unit of work of the message handled last."""
        if self._holds_work:
            self._holds_work = False
            self._admission.release_work()


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""


class MalformedRequest(InvalidArgument):
    """A request message did not parse."""


def _parse_or_mark(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def tolerant(data: bytes):
        try:
            return parse(data)
        except Exception:
            return _Undecodable()

    return tolerant


class _CheckedRequests:
    """A request stream that raises MalformedRequest at the first message that did not parse."""

    def __init__(self, requests: AsyncIterator):
        self._requests = requests.__aiter__()

    def __aiter__(self) -> "_CheckedRequests":
        return self

    async def __anext__(self):
        request = await self._requests.__anext__()
        if isinstance(request, _Undecodable):
            raise MalformedRequest(UNDECODABLE_MESSAGE)
        return request


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT to bytes that are not the RPC's request message.

    gRPC itself answers INTERNAL ("Exception deserializing request!"), which blames the server
    for a client's bug; any client but Python's can send such bytes (e.g. invalid UTF-8).
    """

    def __init__(self) -> None:
        self._guarded = HandlerCache(self._guarded_handler)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._guarded.get(handler)

    @staticmethod
    def _guarded_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = behavior_of(handler)
        tolerant = _parse_or_mark(handler.request_deserializer)

        if handler.request_streaming:

            async def guarded(requests, context):
                try:
                    return await run_behavior(inner, _CheckedRequests(requests), context)
                except MalformedRequest as error:
                    # Reached only through behaviors that map no errors (reflection).
                    await abort_for(context, error)

        else:

            async def guarded(request, context):
                if isinstance(request, _Undecodable):
                    await abort_for(context, MalformedRequest(UNDECODABLE_MESSAGE))
                return await run_behavior(inner, request, context)

        return replace_behavior(handler, guarded, request_deserializer=tolerant)
