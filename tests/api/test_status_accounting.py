"""The access log and grpc_server_handled_total record the status the client gets.

A handler that raised something other than an abort left the context's code unset; both
wrappers read that as OK while gRPC answered UNKNOWN (a review found it with a JWT whose
``alg`` was a list).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from api.accesslog import AccessLogInterceptor
from processor import serving
from processor.metrics import GrpcMetrics, MetricsInterceptor

METHOD = "/test.Svc/Call"


def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"raise":
        raise RuntimeError("a bug")
    if request == b"abort":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    return b"ok"


class Handlers(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return grpc.unary_unary_rpc_method_handler(behaviour)


@pytest.fixture
def served() -> Iterator[tuple[grpc.UnaryUnaryMultiCallable, CollectorRegistry, list[str]]]:
    registry, logged = CollectorRegistry(), []
    interceptors = [
        MetricsInterceptor(GrpcMetrics(registry)),
        AccessLogInterceptor(lambda code, fields: logged.append(code)),
    ]
    server = serving.new_server(2, None, [], interceptors)
    server.add_generic_rpc_handlers((Handlers(),))
    port = serving.bind(server, "127.0.0.1:0", None)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel.unary_unary(METHOD), registry, logged
    finally:
        channel.close()
        server.stop(None).wait()


def handled(registry: CollectorRegistry, code: str) -> float:
    labels = {"grpc_service": "test.Svc", "grpc_method": "Call", "grpc_type": "unary"}
    value = registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code})
    return value or 0.0


@pytest.mark.parametrize(
    ("request_", "code"),
    [(b"fine", "OK"), (b"abort", "INVALID_ARGUMENT"), (b"raise", "UNKNOWN")],
)
def test_the_status_recorded_is_the_status_sent(
    served: Any, request_: bytes, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    call, registry, logged = served
    caplog.set_level(logging.CRITICAL)  # gRPC logs the handler's exception
    try:
        call(request_, timeout=10)
        sent = "OK"
    except grpc.RpcError as exc:
        sent = exc.code().name
    assert sent == code
    assert logged == [code]
    assert handled(registry, code) == 1
    assert sum(handled(registry, c) for c in ("OK", "INVALID_ARGUMENT", "UNKNOWN")) == 1
