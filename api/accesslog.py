"""One JSON log line per request, written by the outermost interceptor.

Handlers add what they decided with :func:`note`; the interceptor adds method, peer,
status and latency. Image bytes and tokens never reach the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import grpc

log = logging.getLogger("imagescaler.access")

_fields: ContextVar[dict[str, Any] | None] = ContextVar("access_fields", default=None)


def note(**fields: Any) -> None:
    """Attach fields to the current request's log line (no-op outside a request)."""
    current = _fields.get()
    if current is not None:
        current.update(fields)


class AccessLogInterceptor(grpc.ServerInterceptor):
    """Logs every unary call with its final status, however the call ended."""

    def __init__(self, on_done: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self._on_done = on_done

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        inner = handler.unary_unary

        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            fields: dict[str, Any] = {}
            token = _fields.set(fields)
            started = time.perf_counter()
            try:
                return inner(request, context)
            finally:
                _fields.reset(token)
                code = _write(method, context, fields, started)
                if self._on_done:
                    self._on_done(code, fields)

        return grpc.unary_unary_rpc_method_handler(
            logged, handler.request_deserializer, handler.response_serializer
        )


def _write(
    method: str, context: grpc.ServicerContext, fields: dict[str, Any], started: float
) -> str:
    """Log the request; returns its status code name."""
    code = context.code() or grpc.StatusCode.OK
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    # Unauthenticated service (--auth none) is loud on every line.
    level = logging.WARNING if fields.get("auth") == "none" else logging.INFO
    log.log(
        level,
        "request",
        extra={
            "method": method,
            "peer": context.peer(),
            "status": name,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            **fields,
        },
    )
    return name
