"""Read a unary call's request only when its handler needs it.

gRPC's sync server receives a unary call's whole request before any behaviour runs, so every
refusal (bad token, rate limit, tenant in-flight cap) came after the client had uploaded its
image: under overload, refused callers waited for megabytes to cross a saturated machine and
the API spent CPU receiving bodies it then threw away. As the innermost interceptor, this
turns each unary handler into a request-streaming one (the same bytes on the wire) whose
behaviour reads the single message last: the interceptors outside it decide from the
metadata alone, and a refusal ends the call before the body is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


class LazyRequestInterceptor(grpc.ServerInterceptor):
    """Unary handlers of ``services`` become stream-unary ones that read their request last."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._prefixes = tuple(f"/{service}/" for service in services)

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
            _reading_last(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _reading_last(behaviour: Behaviour) -> Behaviour:
    def read_then_handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        try:
            request = next(requests, None)
        except grpc.RpcError:  # the client went away while sending
            context.abort(grpc.StatusCode.CANCELLED, "client cancelled the request")
        if request is None:  # the client half-closed without a message, or the call ended
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        return behaviour(request, context)

    return read_then_handle
