"""``imagescaler-processor``: the pixel-work micro-service."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from processor import config, imaging, logs, metrics, serving, tls
from processor.metrics import GrpcMetrics, MetricsInterceptor, PipelineMetrics
from processor.service import SERVICE_NAME, Admission, ProcessorService, add_to_server

log = logging.getLogger("imagescaler.processor")


@dataclass
class Running:
    """A started server and what tests and ``main()`` need to talk to or stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    in_flight: serving.InFlight
    registry: CollectorRegistry
    stop_metrics: Callable[[], None]
    probe: grpc.Server | None = None
    probe_port: int | None = None

    def stop(self, grace: float | None = None, delay: float = 0.0) -> None:
        """Drain (see :func:`serving.drain`); the probe port answers NOT_SERVING meanwhile."""
        serving.drain(self.server, self.health, grace or 0, self.in_flight, delay)
        if self.probe:
            self.probe.stop(None)
        self.stop_metrics()


def server_options(settings: config.ProcessorSettings) -> list[tuple[str, object]]:
    """Message limits, plus a maximum connection age so clients re-resolve after a scale-out."""
    age_ms = int(settings.max_connection_age * 1000)
    return serving.message_options(
        settings.max_input_bytes,
        [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", int(settings.grace * 1000)),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )


def credentials(settings: config.ProcessorSettings) -> grpc.ServerCredentials | None:
    """Mutual TLS (reloaded from disk on rotation), or plaintext for loopback development."""
    if settings.insecure:
        return None
    assert settings.tls_cert and settings.tls_key and settings.tls_client_ca
    return tls.server_credentials(
        Path(settings.tls_cert), Path(settings.tls_key), Path(settings.tls_client_ca)
    )


def interceptors(
    settings: config.ProcessorSettings, in_flight: serving.InFlight, registry: CollectorRegistry
) -> list[grpc.ServerInterceptor]:
    """Drain accounting and metrics see every call, a refused one too; then the identity
    check, so a caller with a disallowed certificate reaches no service."""
    chain: list[grpc.ServerInterceptor] = [in_flight, MetricsInterceptor(GrpcMetrics(registry))]
    if settings.allow_client:
        chain.append(tls.PeerCheckInterceptor(tls.AllowedPeers(frozenset(settings.allow_client))))
    return chain


def grpc_server(
    settings: config.ProcessorSettings, in_flight: serving.InFlight, registry: CollectorRegistry
) -> grpc.Server:
    """The bare server: threads, options and interceptors; admission is the servicer's."""
    return serving.new_server(
        settings.threads,
        None,
        server_options(settings),
        interceptors(settings, in_flight, registry),
    )


def build_server(settings: config.ProcessorSettings) -> Running:
    """Build, bind and start the server; returns the bound port (tests listen on port 0)."""
    in_flight, registry = serving.InFlight(), metrics.new_registry()
    server = grpc_server(settings, in_flight, registry)
    limits = imaging.Limits(max_bytes=settings.max_input_bytes, max_pixels=settings.max_pixels)
    admission = Admission(settings.workers, settings.queue, settings.memory_budget)
    service = ProcessorService(limits, PipelineMetrics(registry), admission)
    add_to_server(service, server)
    servicer = serving.add_health_and_reflection(server, [SERVICE_NAME])
    port = serving.bind(server, settings.listen, credentials(settings))
    server.start()
    stop_metrics = metrics.serve(registry, settings.metrics_port, settings.listen)
    running = Running(server, port, servicer, in_flight, registry, stop_metrics)
    if settings.probe_listen:
        running.probe, running.probe_port = tls.start_probe_server(settings.probe_listen, servicer)
    return running


def main(argv: Sequence[str] | None = None) -> None:
    settings = config.load(argv)
    logs.configure(settings.log_level)
    running = serving.build_or_exit(build_server, settings)
    frozen = serving.freeze_startup_heap()
    log.info(
        "serving",
        extra={"port": running.port, "frozen_objects": frozen, "settings": asdict(settings)},
    )
    if settings.insecure:
        log.warning("plaintext gRPC (--insecure): for development on loopback only")
    serving.wait_for_signal()
    running.stop(settings.grace, settings.drain_delay)


if __name__ == "__main__":
    main()
