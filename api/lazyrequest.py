"""Read a unary call's request only when its handler needs it.

gRPC's sync server receives a unary call's whole request before any behaviour runs, so every
refusal (bad token, rate limit, tenant in-flight cap) came after the client had uploaded its
image: under overload, refused callers waited for megabytes to cross a saturated machine and
the API spent CPU receiving bodies it then threw away. As the innermost interceptor, this
turns each unary handler into a request-streaming one (the same bytes on the wire) whose
behaviour reads the single message last: the interceptors outside it decide from the
metadata alone, and a refusal ends the call before the body is read.

The read is bounded: by then the call holds a worker thread and its tenant's in-flight slot,
so a client that never sends its body (or a half-open connection) would hold them for good
when it set no deadline. gRPC enforces a deadline the client set; a call with none, or one
beyond ``--max-deadline``, is cancelled by one shared watchdog thread when the API's own
deadline for it passes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from api.service import Deadline
from processor.errors import DEADLINE_SLACK

log = logging.getLogger(__name__)

Behaviour = Callable[[Any, grpc.ServicerContext], Any]
END_GRACE = 0.5  # s a call without a message may take to show it was cancelled


class LazyRequestInterceptor(grpc.ServerInterceptor):
    """Unary handlers of ``services`` become stream-unary ones that read their request last."""

    def __init__(self, services: tuple[str, ...], deadline: float, max_deadline: float) -> None:
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._deadline, self._max_deadline = deadline, max_deadline

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler.unary_unary is None
            or not handler_call_details.method.startswith(self._prefixes)
        ):
            return handler
        return grpc.stream_unary_rpc_method_handler(
            _reading_last(handler.unary_unary, self._deadline, self._max_deadline),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _reading_last(behaviour: Behaviour, default: float, cap: float) -> Behaviour:
    def read_then_handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        watched = None
        if remaining is None or remaining > cap:  # gRPC would wait for the body for ever
            watched = _WATCHDOG.watch(Deadline.of(context, default, cap).expires, context)
        try:
            request = next(requests, None)
        except grpc.RpcError:  # the client went away while sending, or the watchdog fired
            if watched is not None and watched.fired:
                log.warning("request body not received in time: call cancelled")
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request body not received")
            _abort_ended(context)
        finally:
            if watched is not None:
                watched.context = None
        if request is None:  # the client half-closed without a message, or the call ended
            if _ends_soon(context):
                _abort_ended(context)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        return behaviour(request, context)

    return read_then_handle


def _ends_soon(context: grpc.ServicerContext) -> bool:
    """Whether the call ends within END_GRACE or by its deadline: a read that found no
    message is a client that half-closed without one (the call stays open for the answer) or
    a call that ended, whose end gRPC reports a moment after the read."""
    ended = threading.Event()
    if not context.add_callback(ended.set):
        return True  # already over
    left = context.time_remaining()
    if ended.wait(END_GRACE if left is None else max(0.0, min(END_GRACE, left - DEADLINE_SLACK))):
        return True
    left = context.time_remaining()
    return left is not None and left <= DEADLINE_SLACK


def _abort_ended(context: grpc.ServicerContext) -> NoReturn:
    """Abort a call that ended before its message arrived with what the caller got.

    Its deadline passed (DEADLINE_EXCEEDED), or gRPC refused a message over
    ``grpc.max_receive_message_length`` (it answers RESOURCE_EXHAUSTED itself and tears the
    call down: no peer is left, which a deadline does too, hence the order), or the caller
    cancelled (it keeps its peer).
    """
    left = context.time_remaining()
    if left is not None and left <= DEADLINE_SLACK:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request message not received in time")
    if not context.peer():
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "request message too large")
    context.abort(grpc.StatusCode.CANCELLED, "client cancelled the request")
    raise AssertionError("abort returned")  # pragma: no cover


class _Watch:
    __slots__ = ("context", "expires", "fired", "order")

    def __init__(self, expires: float, order: int, context: grpc.ServicerContext) -> None:
        self.expires, self.order = expires, order
        self.context: grpc.ServicerContext | None = context  # None once the read ended
        self.fired = False

    def __lt__(self, other: _Watch) -> bool:
        return (self.expires, self.order) < (other.expires, other.order)


class _Watchdog:
    """Cancels calls still reading their request when their time is up: one thread, a heap."""

    def __init__(self) -> None:
        self._heap: list[_Watch] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, expires: float, context: grpc.ServicerContext) -> _Watch:
        entry = _Watch(expires, next(self._order), context)
        with self._wake:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="body-watchdog")
                self._thread.daemon = True
                self._thread.start()
            if self._heap[0] is entry:
                self._wake.notify()
        return entry

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._heap and self._heap[0].context is None:
                    heapq.heappop(self._heap)  # read in time: forget it
                if not self._heap:
                    self._wake.wait()
                    continue
                due = self._heap[0].expires - time.monotonic()
                if due > 0:
                    self._wake.wait(due)
                    continue
                entry = heapq.heappop(self._heap)
                context, entry.context = entry.context, None
                entry.fired = True
            if context is not None:
                context.cancel()  # next(requests) raises in the handler's thread


_WATCHDOG = _Watchdog()
