"""``imagescaler-api``: the public gRPC API gateway."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health

from api import config
from api.accesslog import AccessLogInterceptor
from api.fetch import Fetcher, FetchPolicy
from api.forwarding import ProcessorClient, channel_options
from api.pb import imagescaler_pb2, imagescaler_pb2_grpc
from api.service import Authorizer, ScalerService
from processor import logs, serving

log = logging.getLogger("imagescaler.api")

SERVICE_NAME = imagescaler_pb2.DESCRIPTOR.services_by_name["ImageScaler"].full_name


@dataclass
class Running:
    """A started API server and what tests and ``main()`` need to stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    closers: list[object] = field(default_factory=list)

    def stop(self, grace: float | None = None) -> None:
        serving.drain(self.server, self.health, grace or 0)
        self.close()

    def close(self) -> None:
        """Release what the server used (processor channel, limiter connections)."""
        for closer in self.closers:
            closer.close()  # type: ignore[attr-defined]


def processor_channel(settings: config.ApiSettings) -> grpc.Channel:
    options = channel_options(settings.max_input_bytes)
    if settings.processor_insecure:
        return grpc.insecure_channel(settings.processor, options=options)
    assert settings.processor_ca and settings.processor_cert and settings.processor_key
    with (
        open(settings.processor_ca, "rb") as ca,
        open(settings.processor_key, "rb") as key,
        open(settings.processor_cert, "rb") as cert,
    ):
        creds = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
    if settings.processor_server_name:
        options.append(("grpc.ssl_target_name_override", settings.processor_server_name))
    return grpc.secure_channel(settings.processor, creds, options=options)


def fetch_policy(settings: config.ApiSettings) -> FetchPolicy:
    return FetchPolicy(
        max_bytes=settings.max_input_bytes,
        connect_timeout=settings.fetch_connect_timeout,
        total_timeout=settings.fetch_timeout,
        max_redirects=settings.fetch_max_redirects,
        allow_cidrs=settings.allow_source_cidr,
    )


def allow_all(scope: str) -> None:
    """The authorizer of ``--auth none``: every feature is open."""


def build_server(
    settings: config.ApiSettings,
    fetcher: Fetcher | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    authorize: Authorizer = allow_all,
) -> Running:
    """Build, bind and start the API; returns the bound port (tests listen on port 0)."""
    channel = processor_channel(settings)
    service = ScalerService(
        settings,
        ProcessorClient(lambda: channel),
        fetcher or Fetcher(fetch_policy(settings)),
        authorize,
    )
    chain = [AccessLogInterceptor(), *interceptors]
    server = serving.new_server(
        settings.workers,
        settings.max_concurrent_rpcs,
        serving.message_options(settings.max_input_bytes),
        chain,
    )
    imagescaler_pb2_grpc.add_ImageScalerServicer_to_server(service, server)
    servicer = serving.add_health_and_reflection(server, [SERVICE_NAME])
    port = serving.bind(server, settings.listen, listener_credentials(settings))
    server.start()
    return Running(server, port, servicer, [channel])


def listener_credentials(settings: config.ApiSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    assert settings.tls_key
    with open(settings.tls_key, "rb") as key, open(settings.tls_cert, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


def main(argv: Sequence[str] | None = None) -> None:
    settings = config.load(argv)
    logs.configure(settings.log_level)
    running = build_server(settings)
    log.info("serving", extra={"port": running.port, "settings": settings.public()})
    if not settings.tls_cert:
        log.warning(
            "public listener is plaintext: bearer tokens cross the network in clear; "
            "use --tls-cert/--tls-key beyond loopback development"
        )
    serving.serve_until_signal(running.server, running.health, settings.grace, running.close)
