"""Prometheus metrics: the standard gRPC server set plus each service's own.

Every process builds one :class:`prometheus_client.CollectorRegistry` in ``main()`` (tests
build their own) and serves it on ``/metrics`` of its metrics port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from processor.serving import Behaviour, UnaryInterceptor
from processor.tls import loopback_host

MEGAPIXEL_BUCKETS = (0.1, 0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GrpcMetrics:
    """``grpc_server_*`` as the go-grpc-prometheus convention names them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight",
            "RPCs being handled now.",
            ("grpc_service", "grpc_method"),
            registry=registry,
        )


class MetricsInterceptor(UnaryInterceptor):
    """Counts and times every unary call, whatever status it ends with."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self.metrics = metrics

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        service, _, name = method.lstrip("/").rpartition("/")
        m, labels = self.metrics, (service, name, "unary")

        def measured(request: Any, context: grpc.ServicerContext) -> Any:
            m.started.labels(*labels).inc()
            in_flight = m.in_flight.labels(service, name)
            in_flight.inc()
            started, raised = time.perf_counter(), True
            try:
                reply = behaviour(request, context)
                raised = False
                return reply
            finally:
                in_flight.dec()
                m.seconds.labels(*labels).observe(time.perf_counter() - started)
                m.handled.labels(*labels, code_name(context, raised)).inc()

        return measured


def code_name(context: grpc.ServicerContext, raised: bool = False) -> str:
    """The status the call ended with: the one the handler set or aborted with, else OK, or
    UNKNOWN if it raised (what gRPC answers for an exception that is not an abort)."""
    code = context.code() or (grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK)
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def new_registry() -> CollectorRegistry:
    """Our series plus the process's own (``process_*`` CPU, memory and file descriptors,
    ``python_gc_*``, ``python_info``), which prometheus_client's default registry has and a
    registry of our own would otherwise lose."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def serve(registry: CollectorRegistry, port: int, listen: str) -> Callable[[], None]:
    """Serve ``/metrics`` on ``port`` (0 means off); returns a function that stops it.

    A server listening on loopback only (``make run``, development) keeps its metrics there
    too: tenant ids and refusal reasons are not for the network. Otherwise all interfaces,
    for the scraper.
    """
    if port == 0:
        return lambda: None
    host = loopback_host(listen) or "0.0.0.0"
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:  # say which of the server's ports it is
        raise OSError(exc.errno, f"metrics port {port}: {exc.strerror}") from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop


class PipelineMetrics:
    """Where the processor's time goes, and how big its inputs are."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage_seconds = Histogram(
            "imagescaler_processing_seconds",
            "Pipeline time by stage.",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.input_megapixels = Histogram(
            "imagescaler_input_megapixels",
            "Declared size of processed inputs.",
            buckets=MEGAPIXEL_BUCKETS,
            registry=registry,
        )
        self.outcomes = Counter(
            "imagescaler_processed_total",
            "Processed images by what was done.",
            ("scaled", "grayscale", "passthrough"),
            registry=registry,
        )

    def observe(
        self,
        decode_ms: float,
        transform_ms: float,
        encode_ms: float,
        megapixels: float,
        scaled: bool,
        grayscale: bool,
        passthrough: bool,
    ) -> None:
        for stage, ms in (
            ("decode", decode_ms),
            ("transform", transform_ms),
            ("encode", encode_ms),
        ):
            self.stage_seconds.labels(stage).observe(ms / 1000)
        self.input_megapixels.observe(megapixels)
        self.outcomes.labels(
            str(scaled).lower(), str(grayscale).lower(), str(passthrough).lower()
        ).inc()
