"""What every gRPC server of ours shares: health, reflection, limits and a graceful drain."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Room for the protobuf envelope around a maximum-size image.
ENVELOPE = 64 * 1024


def message_options(
    max_message: int, extra: Iterable[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Explicit send/receive limits: gRPC's 4 MiB default is too small for photos."""
    return [
        ("grpc.max_receive_message_length", max_message + ENVELOPE),
        ("grpc.max_send_message_length", max_message + ENVELOPE),
        *extra,
    ]


def new_server(
    workers: int,
    max_concurrent: int | None,
    options: list[tuple[str, Any]],
    interceptors: Iterable[grpc.ServerInterceptor] = (),
) -> grpc.Server:
    """A thread-pool server; RPCs beyond ``max_concurrent`` get RESOURCE_EXHAUSTED at once."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=list(interceptors),
        options=options,
        maximum_concurrent_rpcs=max_concurrent,
    )


def add_health_and_reflection(
    server: grpc.Server, services: Iterable[str]
) -> health.HealthServicer:
    """Register grpc.health.v1 (every service SERVING) and server reflection."""
    names = list(services)
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind and return the port actually bound (tests listen on port 0)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def drain(server: grpc.Server, servicer: health.HealthServicer, grace: float) -> None:
    """Report NOT_SERVING, refuse new RPCs and let in-flight ones finish within ``grace``."""
    servicer.enter_graceful_shutdown()
    server.stop(grace).wait()


def serve_until_signal(
    server: grpc.Server,
    servicer: health.HealthServicer,
    grace: float,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Block until SIGTERM or SIGINT, then drain; the recipe's last step in every ``main()``."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("draining", extra={"grace_seconds": grace})
    drain(server, servicer, grace)
    if on_stop:
        on_stop()
    log.info("stopped")
