"""The API's own Prometheus metrics (the gRPC server set lives in processor.metrics).

Tenant labels come only from verified, registered tenants, so their number is bounded by
the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from processor.metrics import LATENCY_BUCKETS, MEGAPIXEL_BUCKETS

BYTES_BUCKETS = (1e4, 1e5, 5e5, 1e6, 2.5e6, 5e6, 1e7, 2.5e7, 5e7)


class _Count(Collector):
    """Exports a count kept elsewhere (e.g. the limiter's storage failures) as a counter."""

    def __init__(self, name: str, doc: str, read: Callable[[], int]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.read())


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "imagescaler_requests_total",
            "Finished requests by tenant and status.",
            ("tenant", "grpc_code"),
            registry=registry,
        )
        self.ratelimit = Counter(
            "imagescaler_ratelimit_total",
            "Rate-limit decisions by tenant.",
            ("tenant", "result"),
            registry=registry,
        )
        self.auth_failures = Counter(
            "imagescaler_auth_failures_total",
            "Refused tokens by reason.",
            ("reason",),
            registry=registry,
        )
        self.decisions = Counter(
            "imagescaler_decisions_total",
            "What the processor was asked to do.",
            ("decision",),
            registry=registry,
        )
        self.input_megapixels = Histogram(
            "imagescaler_api_input_megapixels",
            "Declared size of accepted inputs.",
            buckets=MEGAPIXEL_BUCKETS,
            registry=registry,
        )
        self.fetch_seconds = Histogram(
            "imagescaler_fetch_seconds",
            "Time to fetch URL sources.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fetch_bytes = Histogram(
            "imagescaler_fetch_bytes",
            "Size of fetched URL sources.",
            buckets=BYTES_BUCKETS,
            registry=registry,
        )
        self.upload_seconds = Histogram(
            "imagescaler_storage_upload_seconds",
            "Time to store results.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def count_failures(self, name: str, doc: str, read: Callable[[], int]) -> None:
        self.registry.register(_Count(name, doc, read))

    def record(self, code: str, fields: dict[str, Any]) -> None:
        """Called once per finished request with its access-log fields."""
        tenant = fields.get("tenant")
        if "megapixels" in fields:
            self.input_megapixels.observe(fields["megapixels"])
        if "fetch_ms" in fields:
            self.fetch_seconds.observe(fields["fetch_ms"] / 1000)
            self.fetch_bytes.observe(fields.get("bytes_in", 0))
        if "upload_ms" in fields:
            self.upload_seconds.observe(fields["upload_ms"] / 1000)
        if "auth_failure" in fields:
            self.auth_failures.labels(fields["auth_failure"]).inc()
        if tenant is None:
            return
        self.requests.labels(tenant, code).inc()
        limited = "retry_after" in fields  # noted by every limiter refusal, nothing else
        self.ratelimit.labels(tenant, "denied" if limited else "allowed").inc()
        if "scaled" in fields:
            decision = "scale" if fields["scaled"] else "keep-size"
            if fields.get("passthrough"):
                decision = "passthrough"
            self.decisions.labels(decision).inc()
            self.decisions.labels("grayscale" if fields.get("grayscale") else "color").inc()
