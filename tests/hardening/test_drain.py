"""The drain on SIGTERM (processor/serving.py) against real servers on loopback.

A call accepted before the stop finishes even if its request is still arriving, health
``Watch`` streams do not hold the drain for the grace period, and the processor's identity
check keeps ``Watch`` non-blocking (one open watch must not cost a thread).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from processor import serving
from processor.tls import AllowedPeers, PeerCheckInterceptor, server_credentials
from tools import certs

BODY = 4 << 20  # far more than one HTTP/2 flow-control window
HEAD = 16 << 10  # bytes the relay lets through before holding: headers and a bit of body
GRACE = 20.0  # generous: a broken drain shows as a CANCELLED call, not as a slow test
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Relay:
    """TCP relay on loopback for one connection: client bytes beyond ``head`` wait for
    :attr:`release`; :attr:`holding` is set once some are waiting. Replies pass freely."""

    def __init__(self, upstream_port: int, head: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port, self.head = upstream_port, head
        self.holding, self.release = threading.Event(), threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.sockets += [client, upstream]
        for args in ((client, upstream, self.head), (upstream, client, None)):
            thread = threading.Thread(target=self._pipe, args=args, daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pipe(self, source: socket.socket, sink: socket.socket, head: int | None) -> None:
        passed = 0
        try:
            while chunk := source.recv(65536):
                if head is not None and not self.release.is_set() and passed + len(chunk) > head:
                    sink.sendall(chunk[: max(0, head - passed)])
                    chunk = chunk[max(0, head - passed) :]
                    self.holding.set()
                    self.release.wait()
                passed += len(chunk)
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side went away: the test decides what that means

    def close(self) -> None:
        self.release.set()
        for s in self.sockets:
            s.close()
        for t in self.threads:
            t.join(10)


class Accepted(grpc.ServerInterceptor):
    """Sets :attr:`event` when a call's headers have arrived and gRPC has accepted it."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method == "/test.Upload/Size":
            self.event.set()
        return continuation(handler_call_details)


class StopsRecorded:
    """The server as :func:`serving.drain` sees it; ``on_stop`` runs after each ``stop``."""

    def __init__(self, server: grpc.Server, on_stop: Callable[[], None]) -> None:
        self.server, self.on_stop = server, on_stop

    def stop(self, grace: float | None) -> threading.Event:
        stopped = self.server.stop(grace)
        self.on_stop()
        return stopped


def size(request: bytes, context: grpc.ServicerContext) -> bytes:
    return str(len(request)).encode()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def upload_server(stack: ExitStack, accepted: Accepted) -> tuple[Any, Any, serving.InFlight, int]:
    in_flight = serving.InFlight()
    options = serving.message_options(BODY)
    server = serving.new_server(4, 4, options, [accepted, in_flight])
    handler = grpc.unary_unary_rpc_method_handler(size)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Upload", {"Size": handler})]
    )
    health = serving.add_health_and_reflection(server, ["test.Upload"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stack.callback(server.stop, None)
    return server, health, in_flight, port


def test_call_whose_request_is_still_arriving_when_the_drain_starts_completes(
    stack: ExitStack,
) -> None:
    accepted = Accepted()
    server, health, in_flight, port = upload_server(stack, accepted)
    relay = Relay(port, HEAD)
    stack.callback(relay.close)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{relay.port}", options=serving.message_options(BODY, client=True)
    )
    stack.callback(channel.close)
    stack.callback(relay.release.set)  # a failing test must not leave the call stuck
    call = channel.unary_unary("/test.Upload/Size").future(b"x" * BODY, timeout=60)
    # gRPC has accepted the call (its headers arrived) but holds no whole request yet.
    assert accepted.event.wait(30) and relay.holding.wait(30)

    # The rest of the request arrives only after the server has begun to stop.
    drain = threading.Thread(
        target=serving.drain,
        args=(StopsRecorded(server, relay.release.set), health, GRACE, in_flight),
    )
    drain.start()
    assert call.result() == str(BODY).encode()
    drain.join(GRACE + 10)
    assert not drain.is_alive()


class BlockingWatch(grpc.ServerInterceptor):
    """Wraps behaviours the way PeerCheckInterceptor once did: without gRPC's
    ``experimental_non_blocking`` flag, so ``Watch`` runs as a blocking stream."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_stream is None:
            return handler
        inner = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            lambda request, context: inner(request, context),
            handler.request_deserializer,
            handler.response_serializer,
        )


@pytest.mark.parametrize("wrapped", [False, True], ids=["non-blocking", "blocking"])
def test_drain_ends_health_watches_instead_of_waiting_out_the_grace(
    stack: ExitStack, wrapped: bool
) -> None:
    server = serving.new_server(4, None, [], [BlockingWatch()] if wrapped else [])
    health = serving.add_health_and_reflection(server, ["test.Upload"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stack.callback(server.stop, None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stack.callback(channel.close)
    request = health_pb2.HealthCheckRequest(service="test.Upload")
    watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=GRACE + 30)
    assert next(watch).status == SERVING

    serving.drain(server, health, GRACE, serving.InFlight())
    # Ended by the drain with OK; at the end of the grace gRPC would have cancelled it.
    assert [r.status for r in watch] == [NOT_SERVING]
    assert watch.code() == grpc.StatusCode.OK


class _CallContext:
    """What ``Watch`` needs of a ServicerContext: callbacks that run when the call ends."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        """What gRPC's poller thread does when the call is over."""
        for callback in self.callbacks:
            callback()


def test_a_send_waiting_for_the_poller_does_not_hold_the_health_lock() -> None:
    """gRPC's send on a non-blocking stream waits until the poller thread sees the write done,
    and the poller takes the health servicer's lock to forget a watch whose call ended. A send
    made under that lock (grpc_health sends while holding it) deadlocked a drain in CI; now
    the drain returns, the poller goes on and the send completes."""
    health = serving.DrainingHealth()
    sending, polled, delivered = threading.Event(), threading.Event(), threading.Event()
    released: list[bool] = []

    def send_waiting_for_the_poller(response: Any) -> None:
        if response is not None and response.status == NOT_SERVING:
            sending.set()
            released.append(polled.wait(10))
            delivered.set()

    waiting, ending = _CallContext(), _CallContext()
    request = health_pb2.HealthCheckRequest()
    health.Watch(request, waiting, send_waiting_for_the_poller)  # type: ignore[arg-type]
    health.Watch(request, ending, lambda response: None)  # type: ignore[arg-type]

    def poller() -> None:
        if sending.wait(10):
            ending.end()  # takes the health lock
            polled.set()

    threads = [
        threading.Thread(target=poller),
        threading.Thread(target=health.enter_graceful_shutdown),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert delivered.wait(30)
    assert released == [True]  # the poller got the lock while the send was waiting for it


# --- the processor's identity check and non-blocking streams --------------------------------


def test_peer_check_keeps_the_non_blocking_convention() -> None:
    health = serving.DrainingHealth()
    watch = grpc.unary_stream_rpc_method_handler(health.Watch)
    interceptor = PeerCheckInterceptor(AllowedPeers(frozenset({certs.API_IDENTITY})))
    details: Any = None
    guarded = interceptor.intercept_service(lambda _: watch, details)
    assert guarded is not None and guarded.unary_stream is not None
    assert guarded.unary_stream.experimental_non_blocking is True


def test_open_watches_through_the_peer_check_hold_no_thread(
    tmp_path: Path, stack: ExitStack
) -> None:
    pki = certs.create_dev_pki(tmp_path / "pki")
    allowed = AllowedPeers(frozenset({certs.API_IDENTITY}))
    pool = futures.ThreadPoolExecutor(max_workers=1)  # one thread: a blocking watch takes it
    server = grpc.server(pool, interceptors=[PeerCheckInterceptor(allowed)])
    health = serving.add_health_and_reflection(server, [])
    creds = server_credentials(pki.processor_cert, pki.processor_key, pki.ca_cert)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    stack.callback(server.stop, None)
    client = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(), pki.api_key.read_bytes(), pki.api_cert.read_bytes()
    )
    channel = grpc.secure_channel(f"127.0.0.1:{port}", client)
    stack.callback(channel.close)
    stub = health_pb2_grpc.HealthStub(channel)

    watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=15) for _ in range(3)]
    assert [next(w).status for w in watches] == [SERVING] * 3
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    serving.drain(server, health, GRACE, serving.InFlight())
    assert [[r.status for r in w] for w in watches] == [[NOT_SERVING]] * 3
    assert all(w.code() == grpc.StatusCode.OK for w in watches)
