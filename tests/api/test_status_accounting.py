"""The access log and grpc_server_handled_total record the status the client gets.

A handler that raised something other than an abort left the context's code unset; both
wrappers read that as OK while gRPC answered UNKNOWN (a review found it with a JWT whose
``alg`` was a list).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from api.accesslog import AccessLogInterceptor
from api.lazyrequest import LazyRequestInterceptor
from processor import serving
from processor.metrics import GrpcMetrics, MetricsInterceptor

METHOD = "/test.Svc/Call"
LIMIT = 1000  # grpc.max_receive_message_length


def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"raise":
        raise RuntimeError("a bug")
    if request == b"abort":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    return b"ok"


class Handlers(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return grpc.unary_unary_rpc_method_handler(behaviour)


class Logged(list[str]):
    """The access log's codes; ``event`` is set once one is written."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def write(self, code: str, fields: Any) -> None:
        self.append(code)
        self.event.set()


class Entered(grpc.ServerInterceptor):
    """Sets ``event`` when a stream-unary behaviour starts (before it reads its request)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        inner = handler.stream_unary

        def behaviour(requests: Any, context: grpc.ServicerContext) -> Any:
            self.event.set()
            return inner(requests, context)

        return handler._replace(stream_unary=behaviour)


@pytest.fixture
def served() -> Iterator[tuple[grpc.Channel, CollectorRegistry, Logged, threading.Event]]:
    registry, logged, entered = CollectorRegistry(), Logged(), Entered()
    interceptors = [
        AccessLogInterceptor(logged.write),  # outermost: written once metrics have counted
        MetricsInterceptor(GrpcMetrics(registry)),
        entered,
        LazyRequestInterceptor(("test.Svc",), 30, 300),  # the API's innermost, reads last
    ]
    server = serving.new_server(2, None, [("grpc.max_receive_message_length", LIMIT)], interceptors)
    server.add_generic_rpc_handlers((Handlers(),))
    port = serving.bind(server, "127.0.0.1:0", None)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, registry, logged, entered.event
    finally:
        channel.close()
        server.stop(None).wait()


def handled(registry: CollectorRegistry, code: str) -> float:
    labels = {"grpc_service": "test.Svc", "grpc_method": "Call", "grpc_type": "unary"}
    value = registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code})
    return value or 0.0


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (b"fine", "OK"),
        (b"abort", "INVALID_ARGUMENT"),
        (b"raise", "UNKNOWN"),
        (bytes(LIMIT + 1), "RESOURCE_EXHAUSTED"),  # refused by gRPC itself: was CANCELLED
    ],
)
def test_the_status_recorded_is_the_status_sent(
    served: Any, request_: bytes, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    channel, registry, logged, _ = served
    caplog.set_level(logging.CRITICAL)  # gRPC logs the handler's exception
    try:
        channel.unary_unary(METHOD)(request_, timeout=10)
        sent = "OK"
    except grpc.RpcError as exc:
        sent = exc.code().name
    assert sent == code
    assert logged == [code]
    assert handled(registry, code) == 1
    codes = ("OK", "INVALID_ARGUMENT", "UNKNOWN", "RESOURCE_EXHAUSTED", "CANCELLED")
    assert sum(handled(registry, c) for c in codes) == 1


@pytest.mark.parametrize(
    ("timeout", "cancel", "code"),
    [
        (10, True, "CANCELLED"),  # a real cancel keeps its peer
        (0.5, False, "DEADLINE_EXCEEDED"),  # a deadline leaves none either: not "too large"
    ],
)
def test_a_call_that_ends_before_its_message_is_recorded_as_what_ended_it(
    served: Any, timeout: float, cancel: bool, code: str
) -> None:
    """The other side of the size refusal above, which gRPC also ends without a peer."""
    channel, registry, logged, entered = served
    gate = threading.Event()

    def held() -> Iterator[bytes]:
        gate.wait(10)
        return
        yield b""

    future = channel.stream_unary(METHOD).future(held(), timeout=timeout)
    assert entered.wait(10)  # the API is waiting for the message
    if cancel:
        future.cancel()
    assert logged.event.wait(10)
    gate.set()
    assert logged == [code]
    assert handled(registry, code) == 1
