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

from processor.metrics import code_name
from processor.serving import Behaviour, UnaryInterceptor

log = logging.getLogger("imagescaler.access")

_fields: ContextVar[dict[str, Any] | None] = ContextVar("access_fields", default=None)


def note(**fields: Any) -> None:
    """Attach fields to the current request's log line (no-op outside a request)."""
    current = _fields.get()
    if current is not None:
        current.update(fields)


class AccessLogInterceptor(UnaryInterceptor):
    """Logs every unary call with its final status, however the call ended."""

    def __init__(self, on_done: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self._on_done = on_done

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        def logged(request: Any, context: grpc.ServicerContext) -> Any:
            fields: dict[str, Any] = {}
            token = _fields.set(fields)
            started, raised = time.perf_counter(), True
            try:
                reply = behaviour(request, context)
                raised = False
                return reply
            finally:
                _fields.reset(token)
                code = code_name(context, raised)
                _write(method, context, code, fields, started)
                if self._on_done:
                    self._on_done(code, fields)

        return logged


def _write(
    method: str, context: grpc.ServicerContext, code: str, fields: dict[str, Any], started: float
) -> None:
    # Unauthenticated service (--auth none) is loud on every line.
    level = logging.WARNING if fields.get("auth") == "none" else logging.INFO
    log.log(
        level,
        "request",
        extra={
            "method": method,
            "peer": context.peer(),
            "status": code,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            **fields,
        },
    )
