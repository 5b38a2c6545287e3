"""``imagescaler-api``: the public gRPC API gateway."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from api import config
from api.accesslog import AccessLogInterceptor
from api.fetch import Fetcher, FetchPolicy
from api.forwarding import BytesInFlight, ProcessorClient, channel_options
from api.interceptors import AnonymousInterceptor, AuthInterceptor, current_principal
from api.lazyrequest import LazyRequestInterceptor
from api.metrics import ApiMetrics
from api.ratelimit import Limiter, RateLimitInterceptor, RateLimits, TenantLimits
from api.results import ResultStore, StoreSettings, store_from_uri
from api.service import SERVICE_NAME, ScalerService, add_to_server
from auth.keys import KeyStore
from auth.revocation import revocations_from_url
from auth.tenants import TenantRegistry
from auth.tokens import AuthSettings, TokenVerifier
from processor import logs, metrics, serving, tls
from processor.metrics import GrpcMetrics, MetricsInterceptor

log = logging.getLogger("imagescaler.api")


@dataclass
class Running:
    """A started API server and what tests and ``main()`` need to stop it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    in_flight: serving.InFlight
    registry: CollectorRegistry
    closers: list[object] = field(default_factory=list)
    stop_metrics: Callable[[], None] = lambda: None
    probe: grpc.Server | None = None

    def stop(self, grace: float | None = None, delay: float = 0.0) -> None:
        serving.drain(self.server, self.health, grace or 0, self.in_flight, delay)
        self.close()

    def close(self) -> None:
        """Release what the server used (probe port, processor channel, limiter connections)."""
        if self.probe:
            self.probe.stop(None)
        self.stop_metrics()
        for closer in self.closers:
            closer.close()  # type: ignore[attr-defined]


def processor_channel(settings: config.ApiSettings) -> tls.ReloadingChannel:
    """mTLS that follows certificate rotation on disk (plaintext only when asked for)."""
    client_tls = None
    if not settings.processor_insecure:
        assert settings.processor_ca and settings.processor_cert and settings.processor_key
        client_tls = tls.ClientTls(
            Path(settings.processor_ca),
            Path(settings.processor_cert),
            Path(settings.processor_key),
            settings.processor_server_name,
        )
    options = channel_options(settings.max_input_bytes)
    return tls.ReloadingChannel(settings.processor, client_tls, options, grace=settings.grace)


def fetch_policy(settings: config.ApiSettings) -> FetchPolicy:
    return FetchPolicy(
        max_bytes=settings.max_input_bytes,
        connect_timeout=settings.fetch_connect_timeout,
        total_timeout=settings.fetch_timeout,
        max_redirects=settings.fetch_max_redirects,
        allow_cidrs=settings.allow_source_cidr,
        allowed_ports=frozenset(settings.allow_source_port),
    )


def authentication(
    settings: config.ApiSettings, tenants: TenantRegistry | None
) -> grpc.ServerInterceptor:
    """JWT verification against the JWKS and tenant registry, or the loud legacy mode."""
    if settings.auth == "none":
        return AnonymousInterceptor(tenants)
    assert settings.jwks and tenants
    algorithms = frozenset(settings.token_algorithms)
    verifier = TokenVerifier(
        AuthSettings(
            issuer=settings.issuer,
            audience=settings.audience,
            leeway=settings.token_leeway,
            max_lifetime=settings.max_token_lifetime,
            algorithms=algorithms,
        ),
        KeyStore(settings.jwks, algorithms),
        revocations_from_url(settings.revocations),
    )
    return AuthInterceptor(verifier, tenants)


def limiter(settings: config.ApiSettings, tenants: TenantRegistry | None) -> Limiter:
    """Per-tenant limits from the registry, defaults from the settings."""

    def limits_for(tenant_id: str) -> TenantLimits:
        tenant = tenants.get(tenant_id) if tenants else None
        if tenant is None:
            return TenantLimits()
        return TenantLimits(tenant.rate_limit, tenant.pixel_limit, tenant.max_concurrent)

    rate_limits = RateLimits(
        storage=settings.ratelimit_storage,
        strategy=settings.ratelimit_strategy,
        default_rate=settings.ratelimit_default,
        default_pixels=settings.pixel_limit_default,
        default_max_concurrent=settings.max_concurrent_per_tenant,
        failure_policy=settings.ratelimit_failure,
        timeout=settings.ratelimit_timeout,
    )
    return Limiter(rate_limits, limits_for)


def result_store(settings: config.ApiSettings) -> ResultStore:
    """GCS when ``--result-store gs://...`` is set; otherwise a store that refuses (off)."""
    return store_from_uri(
        settings.result_store,
        StoreSettings(
            url_lifetime=settings.result_url_lifetime,
            signing_key=settings.result_signing_key,
            signing_email=settings.result_signing_email,
        ),
    )


def current_tenant() -> str | None:
    principal = current_principal.get(None)
    return principal.tenant_id if principal else None


def build_server(settings: config.ApiSettings, fetcher: Fetcher | None = None) -> Running:
    """Build, bind and start the API; returns the bound port (tests listen on port 0).

    The interceptor chain, outermost first: drain accounting, metrics, access log,
    authentication, rate limits (which are per verified tenant), and the request read last,
    so that every refusal comes before the image is uploaded.
    """
    channel = processor_channel(settings)
    can_store = settings.result_store is not None
    tenants = TenantRegistry(settings.tenants, can_store=can_store) if settings.tenants else None
    limits = limiter(settings, tenants)
    fetcher = fetcher or Fetcher(fetch_policy(settings))
    store = result_store(settings)
    client = ProcessorClient(channel, BytesInFlight(settings.processor_bytes_in_flight))
    service = ScalerService(settings, client, fetcher, limits, store)
    in_flight, registry = serving.InFlight(), metrics.new_registry()
    api_metrics = ApiMetrics(registry)
    api_metrics.count_failures(
        "imagescaler_ratelimit_storage_errors_total",
        "Rate-limit store (Redis) calls that failed.",
        lambda: limits.failures,
    )
    chain = [
        in_flight,
        MetricsInterceptor(GrpcMetrics(registry)),
        AccessLogInterceptor(api_metrics.record),
        authentication(settings, tenants),
        RateLimitInterceptor(limits, current_tenant),
        LazyRequestInterceptor((SERVICE_NAME,), settings.deadline, settings.max_deadline),
    ]
    options = serving.message_options(
        settings.max_input_bytes,
        # Room for an oversized token to reach the interceptor and get a clear refusal.
        [("grpc.max_metadata_size", 64 * 1024), ("grpc.absolute_max_metadata_size", 64 * 1024)],
    )
    server = serving.new_server(settings.workers, settings.max_concurrent_rpcs, options, chain)
    add_to_server(service.ScaleImage, server)
    servicer = serving.add_health_and_reflection(server, [SERVICE_NAME])
    port = serving.bind(server, settings.listen, listener_credentials(settings))
    server.start()
    stop_metrics = metrics.serve(registry, settings.metrics_port, settings.listen)
    running = Running(server, port, servicer, in_flight, registry, [channel, limits], stop_metrics)
    if settings.probe_listen:
        running.probe, _ = tls.start_probe_server(settings.probe_listen, servicer)
    return running


def listener_credentials(settings: config.ApiSettings) -> grpc.ServerCredentials | None:
    """Server TLS whose files are re-read when they change: a renewed certificate reaches
    new connections without a rollout."""
    if not settings.tls_cert:
        return None
    assert settings.tls_key
    return tls.server_credentials(Path(settings.tls_cert), Path(settings.tls_key), None)


def main(argv: Sequence[str] | None = None) -> None:
    settings = config.load(argv)
    logs.configure(settings.log_level)
    running = serving.build_or_exit(build_server, settings)
    frozen = serving.freeze_startup_heap()
    log.info(
        "serving",
        extra={"port": running.port, "frozen_objects": frozen, "settings": settings.public()},
    )
    if not settings.tls_cert:
        log.warning(
            "public listener is plaintext: bearer tokens cross the network in clear; "
            "use --tls-cert/--tls-key beyond loopback development"
        )
    if settings.processor_insecure:
        log.warning(
            "images go to the processor in plaintext (--processor-insecure): for loopback "
            "development only; use --processor-ca/--processor-cert/--processor-key"
        )
    serving.wait_for_signal()
    running.stop(settings.grace, settings.drain_delay)


if __name__ == "__main__":
    main()
